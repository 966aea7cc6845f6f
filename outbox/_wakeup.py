"""Wake-ups that cost writers nothing while every listener is busy (PostgreSQL).

A transaction that sends a NOTIFY takes a database-wide lock at commit, which serialises the
commits of all such transactions. So writers notify only while someone waits: a listener (a relay
or a database-bus consumer) that found nothing to do takes an advisory lock exclusively
(``events.WAKE_LOCK_CLASS``, hashed channel) on a connection of its own before it sleeps; capture's
trigger tries the same lock *shared* and sends the notification only when it cannot have it. A
busy listener holds nothing, so under load writers take the shared lock and never notify.

No wake-up is lost: the writer's shared lock, once taken, is held to the end of its transaction.

- A writer whose trigger ran *after* the listener took the lock notifies; the notification is
  delivered at commit to every listener of the channel.
- A writer whose trigger ran *before* still holds its shared lock until it commits or rolls back,
  so the listener cannot take the lock meanwhile (:attr:`Idle.WRITERS`): it looks again a moment
  later, and keeps doing so (1 ms, doubling to 50 ms) until the writers are gone.
- A writer that committed before the listener took the lock is seen by the listener's look right
  after taking it (:attr:`Idle.TAKEN`).

Several listeners: one holds the lock; the others find it held exclusively by someone else
(:attr:`Idle.OTHER`) and sleep too, since the notifications it causes reach every listener. A
listener gives the lock back as soon as it has work. If its connection drops, the lock goes with
it; listeners then fall back to their polling interval until they reconnect.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import Any

import anyio

from outbox._sql.ddl import NOTIFY_CHANNEL, WAKE_LOCK_CLASS, WAKE_LOCK_KEY_SQL

__all__ = ["Idle", "IdleLock"]

log = logging.getLogger("outbox")

# Both keys are computed by the server, exactly as the trigger computes them.
_KEY = WAKE_LOCK_KEY_SQL.format(channel="%(channel)s")
_ENTER = f"""
SELECT pg_try_advisory_lock({WAKE_LOCK_CLASS}, {_KEY}),
       EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND classid::bigint = {WAKE_LOCK_CLASS}
                 AND objid::bigint = {_KEY} AND objsubid = 2
                 AND mode = 'ExclusiveLock' AND granted AND pid <> pg_backend_pid()
                 AND database = (SELECT oid FROM pg_database
                                 WHERE datname = current_database()))
"""  # noqa: S608 (constants; the channel is a bound parameter)
_LEAVE = f"SELECT pg_advisory_unlock({WAKE_LOCK_CLASS}, {_KEY})"


class Idle(enum.Enum):
    """What :meth:`IdleLock.enter` found."""

    #: We took the lock just now: look for work once more (it may have committed just before),
    #: then sleep until notified.
    TAKEN = "taken"
    #: We held it already: sleep until notified.
    HELD = "held"
    #: Another listener holds it: writers notify, which wakes us too; sleep until notified.
    OTHER = "other"
    #: Writers are between their insert and their commit: look again in a moment.
    WRITERS = "writers"
    #: No connection (or no psycopg): nobody will be notified on our behalf; poll.
    UNAVAILABLE = "unavailable"


class IdleLock:
    """The advisory lock a waiting listener holds, on a dedicated autocommit connection.

    ``enter()`` when there is nothing to do, ``leave()`` as soon as there is; not thread-safe (one
    event loop), calls are serialised.
    """

    def __init__(self, conninfo: str, *, channel: str = NOTIFY_CHANNEL) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.held = False
        self._conn: Any = None
        self._lock = anyio.Lock()
        self._backoff = 0.0

    async def enter(self) -> Idle:
        """Take the lock if we can; say what that means for the caller (see :class:`Idle`)."""
        async with self._lock:
            # Still ours only while its connection lives (a dropped one released it).
            if self.held and await self._execute("SELECT 1") is not None:
                return Idle.HELD
            row = await self._execute(_ENTER)
            if row is None:
                return Idle.UNAVAILABLE
            mine, other = bool(row[0]), bool(row[1])
            if mine:
                self.held = True
                self._backoff = 0.0
                return Idle.TAKEN
            if other:
                self._backoff = 0.0
                return Idle.OTHER
            return Idle.WRITERS

    def writers_backoff(self) -> float:
        """How long to wait before looking again after :attr:`Idle.WRITERS` (1 ms doubling to
        50 ms while writers keep the lock)."""
        self._backoff = min(0.05, max(0.001, self._backoff * 2))
        return self._backoff

    async def leave(self) -> None:
        """Give the lock back (we have work): writers stop notifying."""
        if not self.held:
            return
        async with self._lock:
            if not self.held:
                return
            self.held = False
            await self._execute(_LEAVE)

    async def close(self) -> None:
        self.held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close()

    async def _execute(self, sql: str) -> tuple[Any, ...] | None:
        """One statement on the lock's connection (connecting first); ``None`` when the database
        cannot be reached: the lock, if we had it, went with the connection."""
        try:
            import psycopg
        except ImportError:  # pragma: no cover - the postgres extra is missing
            return None
        try:
            if self._conn is None or self._conn.closed:
                self.held = False
                self._conn = await psycopg.AsyncConnection.connect(self.conninfo,
                                                                   autocommit=True)
            cursor = await self._conn.execute(sql, {"channel": self.channel})
            row: tuple[Any, ...] | None = await cursor.fetchone()
            return row
        except (psycopg.Error, OSError) as exc:
            log.debug("wake-up lock connection: %s", type(exc).__name__)
            await self.close()
            return None

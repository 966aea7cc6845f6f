"""The provider's background task: LISTEN/NOTIFY wake-ups and lease renewals.

One task per :class:`DatabaseProvider` while it has readers. On PostgreSQL with psycopg it keeps a
dedicated autocommit connection listening on ``outbox_events`` (the events table's statement
trigger notifies once per writing transaction, at commit, while a listener waits: readers with
nothing to do hold the wake-up lock of ``outbox/_wakeup.py``) and wakes every reader of the
provider on each notification. Notifications sent while the listener is disconnected are lost,
so every (re)connect wakes the readers once, and readers poll every ``poll_interval`` anyway.

Every ``lease / 3`` seconds it renews the leases of the claims the readers hold, recording their
progress; a claim found taken over is dropped from its reader.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from outbox._sql import bus as sql
from outbox._sql.ddl import NOTIFY_CHANNEL
from outbox._wakeup import IdleLock
from outbox.providers._bus import Backoff

if TYPE_CHECKING:
    from outbox.providers.database.provider import DatabaseProvider

__all__ = ["run_keeper"]

log = logging.getLogger("outbox.providers.database")


async def run_keeper(provider: DatabaseProvider) -> None:
    """Run until cancelled."""
    listen = provider.notify and provider._listen_args() is not None
    backoff = Backoff(initial=0.2, maximum=10.0)
    conn: Any = None
    reconnect_at = 0.0
    interval = max(provider.lease / 3.0, 0.05)
    next_renew = time.monotonic() + interval
    if listen:  # readers that wait hold it, so that writers notify (outbox/_wakeup.py)
        provider._wakeup = IdleLock(_conninfo(provider))
    try:
        while True:
            now = time.monotonic()
            if listen and conn is None and now >= reconnect_at:
                try:
                    conn = await _connect(provider)
                    backoff.reset()
                    provider._wake_all()  # anything committed while not listening
                except Exception as exc:
                    delay = backoff.next()
                    reconnect_at = now + delay
                    log.warning("LISTEN %s failed (%s: %s); polling every %.1f s, retrying in "
                                "%.1f s", NOTIFY_CHANNEL, type(exc).__name__, exc,
                                provider.poll_interval, delay)
            timeout = max(0.0, next_renew - time.monotonic())
            if conn is not None:
                try:
                    async for _note in conn.notifies(timeout=timeout):
                        provider._wake_all()
                except Exception as exc:
                    log.warning("LISTEN connection lost (%s: %s); reconnecting",
                                type(exc).__name__, exc)
                    with contextlib.suppress(Exception):
                        await conn.close()
                    conn = None
                    reconnect_at = time.monotonic() + backoff.next()
            else:
                wait = timeout if not listen else min(timeout, max(0.0, reconnect_at - now))
                await anyio.sleep(wait)
            if time.monotonic() >= next_renew:
                await _renew(provider)
                next_renew = time.monotonic() + interval
    finally:
        wakeup, provider._wakeup = provider._wakeup, None
        if wakeup is not None:
            await wakeup.close()
        if conn is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close()


def _conninfo(provider: DatabaseProvider) -> str:
    from psycopg.conninfo import make_conninfo

    kwargs = provider._listen_args()
    assert kwargs is not None
    return make_conninfo("", **kwargs)


async def _connect(provider: DatabaseProvider) -> Any:
    import psycopg

    kwargs = provider._listen_args()
    assert kwargs is not None
    conn = await psycopg.AsyncConnection.connect(**kwargs, autocommit=True)
    try:
        await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _renew(provider: DatabaseProvider) -> None:
    for reader in list(provider._readers):
        for claim in reader.held():
            try:
                outcome = await provider._tx(sql.renew, reader.group, claim.hi, claim.token,
                                             claim.progress(), provider.lease)
            except Exception as exc:
                log.debug("lease renewal for group %r failed: %s", reader.group, exc)
                continue
            if outcome == "lost" and claim.token in reader.claims:
                reader.lost(claim)

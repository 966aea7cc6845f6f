"""PostgreSQL ``LISTEN`` on a dedicated connection, reconnecting after a drop.

Capture's statement trigger sends one ``NOTIFY outbox_events`` per writing transaction, delivered
at commit; each notification wakes the relay. Notifications sent while the listener is
disconnected are lost, so after every (re)connect the relay is woken once to look for itself, and
polling every ``poll_interval`` stays on as the fallback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
from sqlalchemy.engine import URL

from outbox._redact import url_text
from outbox._sql.ddl import NOTIFY_CHANNEL
from outbox.exceptions import MissingDependency

__all__ = ["PgListener", "conninfo_from_url"]

log = logging.getLogger("outbox.relay")


def conninfo_from_url(url: URL) -> str:
    """A libpq connection string for psycopg from a SQLAlchemy URL (query options kept)."""
    try:
        from psycopg.conninfo import make_conninfo
    except ImportError as exc:  # pragma: no cover - the postgres extra is missing
        raise MissingDependency("LISTEN/NOTIFY", "postgres", "psycopg") from exc
    params: dict[str, object] = {}
    if url.host:
        params["host"] = url.host
    if url.port:
        params["port"] = url.port
    if url.username:
        params["user"] = url.username
    if url.password:
        params["password"] = url.password
    if url.database:
        params["dbname"] = url.database
    for key, value in url.query.items():
        params[key] = value if isinstance(value, str) else value[-1]
    return make_conninfo("", **params)  # type: ignore[arg-type]


class PgListener:
    """Calls ``wake()`` on every notification of ``channel``; runs until cancelled."""

    def __init__(
        self,
        url: URL,
        wake: Callable[[], None],
        *,
        channel: str = NOTIFY_CHANNEL,
        on_state: Callable[[bool], None] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.conninfo = conninfo_from_url(url)
        self.channel = channel
        self.wake = wake
        self.on_state = on_state or (lambda _connected: None)
        self.max_backoff = max_backoff
        self.notifications = 0
        self.connects = 0
        self._redacted = url_text(url)

    async def run(self) -> None:
        import psycopg
        from psycopg import sql

        backoff = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection to %s failed (%s); polling meanwhile, retrying in "
                            "%.1fs", self._redacted, type(exc).__name__, backoff)
                await anyio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self.connects += 1
                backoff = 0.1
                self.on_state(True)
                self.wake()  # anything committed while we were not listening
                async for _ in conn.notifies():
                    self.notifications += 1
                    self.wake()
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self.on_state(False)
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await conn.close()
            await anyio.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)

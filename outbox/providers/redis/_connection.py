"""The Redis client of a provider: how it is made (URL, TLS, timeouts), and which errors are
outages.

redis-py retries a failing command once, quickly (a pooled connection may be stale after a server
restart); after that the error surfaces as :class:`~outbox.exceptions.ProviderUnavailable` within
``connect_timeout``/``socket_timeout``. Redis errors that are not about one event (``OOM``,
``LOADING``, ``READONLY``, ``WRONGTYPE`` on the stream key, ACL refusals) are outages too: no event
is failed because of the broker.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from outbox.exceptions import ProviderUnavailable

__all__ = ["DEFAULT_URL", "ERRORS", "chunks", "is_outage", "is_stale_connection", "make_client",
           "pairs", "text", "unavailable"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: The exceptions of a Redis call that an outbox caller handles.
ERRORS = (redis_errors.RedisError, OSError)

# Error replies that say "the server cannot take this now", not "this event is wrong".
_OUTAGE_REPLIES = frozenset({
    "OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    "NOREPLICAS", "NOAUTH", "WRONGPASS", "NOPERM", "WRONGTYPE", "NOSCRIPT", "UNBLOCKED",
    "MISCONF",
})

T = TypeVar("T")


def make_client(*, url: str | None, host: str | None, port: int | None, db: int | None,
                username: str | None, password: str | None, tls: bool | None,
                ca_file: str | None, cert_file: str | None, key_file: str | None,
                socket_timeout: float, connect_timeout: float) -> Any:
    """An asyncio client for ``url`` (or ``host``/``port``/``db``), TLS for ``rediss://`` or
    ``tls=True``."""
    # One quick retry: a pooled connection can be stale after a server restart. More retries
    # (redis-py's default backs off for seconds) would hide an outage from the relay.
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        "health_check_interval": 15,
    }
    if username is not None:
        options["username"] = username
    if password is not None:
        options["password"] = password
    use_tls = bool(tls) or (url or "").startswith("rediss://")
    if use_tls:
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if ca_file:
            options["ssl_ca_certs"] = ca_file
        if cert_file:
            options["ssl_certfile"] = cert_file
        if key_file:
            options["ssl_keyfile"] = key_file
    if url:
        if tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]
        return aioredis.Redis.from_url(url, **options)
    if use_tls:
        options["ssl"] = True
    return aioredis.Redis(host=host or "127.0.0.1", port=port or 6379, db=db or 0, **options)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the server cannot take requests now (not: this request is wrong)."""
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError
                  | asyncio.TimeoutError):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        return str(exc).split(" ", 1)[0] in _OUTAGE_REPLIES
    return False


def is_stale_connection(exc: BaseException) -> bool:
    """A pooled connection that died with a server restart. redis-py raises this once, from
    checking the connection out of the pool, outside its own retry loop."""
    permanent = redis_errors.AuthenticationError | redis_errors.BusyLoadingError
    return (isinstance(exc, redis_errors.ConnectionError) and not isinstance(exc, permanent)
            and "closed by server" in str(exc).lower())


def unavailable(exc: BaseException, what: str) -> ProviderUnavailable:
    # redis-py messages name host:port, never the password.
    return ProviderUnavailable(f"redis unavailable ({what}): {type(exc).__name__}: {exc}")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    """Lua returns entry fields as a flat [k1, v1, k2, v2, …] list."""
    it = iter(flat)
    return {bytes(k): bytes(v) for k, v in zip(it, it, strict=False)}

"""Redis Streams provider: ``RedisProvider`` (needs ``pip install 'sqlalchemy-outbox[redis]'``).

- :mod:`._provider` — :class:`RedisProvider`, the configuration and the ports;
- :mod:`._connection` — the client (URL, TLS, timeouts) and which errors are outages;
- :mod:`._publisher` — ``XADD`` once per event id, batches pipelined;
- :mod:`._consumer` — consumer groups: a member, its deliveries, reclaim and dead letters;
- :mod:`._tail` — ``stream()``: following the stream without a group.
"""

try:
    import redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from outbox.exceptions import MissingDependency

    raise MissingDependency("RedisProvider", "redis", "redis") from exc

from outbox.providers.redis._consumer import RedisDelivery, RedisGroupReader
from outbox.providers.redis._provider import RedisProvider

__all__ = ["RedisDelivery", "RedisGroupReader", "RedisProvider"]

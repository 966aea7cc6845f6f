"""The providers outbox knows, in one table: adding one is its package plus one entry here.

Everything that lists providers reads :data:`PROVIDERS`: the ``provider`` config key's choices,
:func:`outbox.config.provider_from_config` (which module and class to import, which extra to name
when its driver is missing), ``python -m outbox.consume`` (only providers that carry events to
other processes) and the start lines of the relay and the consumer (where events go, and whether
that address is a default nobody configured). The provider's settings are its section of
:class:`outbox.Config` (``event_broker.<name>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox._redact import redact

__all__ = ["PROVIDERS", "ProviderEntry", "describe", "entry"]


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One provider: where its class lives and how to describe where it sends events."""

    name: str
    #: ``module:Class`` with a ``from_config(config)`` classmethod
    target: str
    #: the pip extra that installs its driver (``pip install 'sqlalchemy-outbox[<extra>]'``)
    extra: str | None = None
    #: the driver's pip package, named in the error when it is missing
    package: str | None = None
    #: top-level modules the provider imports, and the extra that installs each
    drivers: Mapping[str, str] = field(default_factory=dict)
    #: events reach other processes (``python -m outbox.consume`` can read them)
    cross_process: bool = True
    #: ``(address, unset)`` of where events go, from the config, secrets redacted; ``unset``
    #: names the settings nobody gave when the address is the default, else ``None``
    address: Callable[[Any], tuple[str, str | None]] | None = None


def _memory(config: Any) -> tuple[str, str | None]:
    return "in this process only", None


def _redis(config: Any) -> tuple[str, str | None]:
    section = config.redis
    default = section.url is None and (section.host, section.port) == ("127.0.0.1", 6379)
    return redact(section.connection_url()), "redis.url or host" if default else None


def _nats(config: Any) -> tuple[str, str | None]:
    from outbox.config import NATSConfig

    return redact(config.nats.url), "nats.url" if config.nats.url == NATSConfig().url else None


def _database(config: Any) -> tuple[str, str | None]:
    url = config.database.url
    return (redact(str(url)) if url else "the relay's database"), None


PROVIDERS: Mapping[str, ProviderEntry] = {
    e.name: e for e in (
        ProviderEntry("memory", "outbox.providers.memory:MemoryProvider",
                      cross_process=False, address=_memory),
        ProviderEntry("redis", "outbox.providers.redis:RedisProvider", "redis", "redis",
                      {"redis": "redis"}, address=_redis),
        ProviderEntry("nats", "outbox.providers.nats:NATSProvider", "nats", "nats-py",
                      {"nats": "nats"}, address=_nats),
        ProviderEntry("database", "outbox.providers.database:DatabaseProvider", "postgres",
                      "psycopg", {"psycopg": "postgres", "psycopg_binary": "postgres"},
                      address=_database),
    )
}


def entry(name: str) -> ProviderEntry | None:
    """The entry of the provider called ``name``, or ``None``."""
    return PROVIDERS.get(name)


def describe(config: Any) -> str:
    """``config.provider`` and where it sends events, for a start line.

    ``redis redis://127.0.0.1:6379/0 (the default address: no redis.url or host is configured)``
    — a relay meant to forward elsewhere that silently talks to a local server says so at start.
    """
    found = entry(config.provider)
    if found is None or found.address is None:
        return str(config.provider)
    address, unset = found.address(config)
    text = f"{found.name} {address}"
    return f"{text} (the default address: no {unset} is configured)" if unset else text

"""outbox: a transactional outbox for SQLAlchemy.

Commit a change and its event in one transaction (:func:`capture`), relay committed events to
handlers and to Redis Streams / NATS JetStream (``python -m outbox.relay``), and query the history
with SQL. See README.md and docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox._capture import Capture, capture
from outbox.context import context, request_scope, set_context
from outbox.events import (
    Event,
    EventSource,
    EventStatus,
    Operation,
    event_type,
    get_instance_id,
    new_event,
    set_instance_id,
)
from outbox.exceptions import (
    BrokerClosed,
    BrokerNotStarted,
    CaptureError,
    ConfigError,
    EventNotFound,
    HandlerError,
    MalformedMessage,
    MissingDependency,
    OutboxError,
    ProviderError,
    ProviderFull,
    ProviderUnavailable,
    QueueFull,
    SchemaMissing,
    SerializationError,
    UnsupportedOperation,
)

# registers outbox_alembic_version on Event.metadata (the table outbox.migrations records in)
from outbox.migrations import version_table as _version_table  # noqa: F401
from outbox.providers.base import EventFilter, ProviderStats
from outbox.retry import RetryPolicy
from outbox.schema import create_schema  # also registers the outbox_* tables on Event.metadata

if TYPE_CHECKING:  # names resolved lazily below, spelled out for type checkers
    from outbox.broker import (
        Broker,
        BrokerStats,
        get_default_broker,
        initialize,
        publish,
        publish_async,
        publish_sync,
        set_default_broker,
        subscribe,
    )
    from outbox.config import Config, provider_from_config
    from outbox.providers.database import DatabaseProvider
    from outbox.providers.memory import MemoryProvider
    from outbox.providers.nats import NATSProvider
    from outbox.providers.redis import RedisProvider
    from outbox.relay import Relay
    from outbox.sqlite import sqlite_savepoints

__version__ = "0.1.0"

# name -> module that defines it. Imported on first access so that optional drivers (redis,
# nats, psycopg) are only needed by the code that uses them.
_LAZY: dict[str, str] = {
    "Broker": "outbox.broker",
    "BrokerStats": "outbox.broker",
    "initialize": "outbox.broker",
    "set_default_broker": "outbox.broker",
    "get_default_broker": "outbox.broker",
    "publish": "outbox.broker",
    "publish_sync": "outbox.broker",
    "publish_async": "outbox.broker",
    "subscribe": "outbox.broker",
    "Config": "outbox.config",
    "provider_from_config": "outbox.config",
    "MemoryProvider": "outbox.providers.memory",
    "RedisProvider": "outbox.providers.redis",
    "NATSProvider": "outbox.providers.nats",
    "DatabaseProvider": "outbox.providers.database",
    "Relay": "outbox.relay",
    "Consumer": "outbox.consume",
    "sqlite_savepoints": "outbox.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Broker",
    "BrokerClosed",
    "BrokerNotStarted",
    "BrokerStats",
    "Capture",
    "CaptureError",
    "Config",
    "ConfigError",
    "Consumer",
    "DatabaseProvider",
    "Event",
    "EventFilter",
    "EventNotFound",
    "EventSource",
    "EventStatus",
    "HandlerError",
    "MalformedMessage",
    "MemoryProvider",
    "MissingDependency",
    "NATSProvider",
    "Operation",
    "OutboxError",
    "ProviderError",
    "ProviderFull",
    "ProviderStats",
    "ProviderUnavailable",
    "QueueFull",
    "RedisProvider",
    "Relay",
    "RetryPolicy",
    "SchemaMissing",
    "SerializationError",
    "UnsupportedOperation",
    "capture",
    "context",
    "create_schema",
    "event_type",
    "get_default_broker",
    "get_instance_id",
    "initialize",
    "new_event",
    "provider_from_config",
    "publish",
    "publish_async",
    "publish_sync",
    "request_scope",
    "set_context",
    "set_default_broker",
    "set_instance_id",
    "sqlite_savepoints",
    "subscribe",
]

"""outbox: a transactional outbox for SQLAlchemy.

Commit a change and its event in one transaction (:func:`capture`), relay committed events to
handlers and to Redis Streams / NATS JetStream (``python -m outbox.relay``), and query the history
with SQL. See README.md and docs/architecture.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

from outbox._capture import Capture, capture
from outbox._context import context, request_scope, set_context
from outbox._meta import __version__ as __version__
from outbox._retry import RetryPolicy
from outbox.events import Event, EventFilter, EventSource, EventStatus, new_event
from outbox.exceptions import OutboxError

# registers outbox_alembic_version on Event.metadata (the table outbox.migrations records in)
from outbox.migrations import version_table as _version_table  # noqa: F401
from outbox.schema import create_schema  # also registers the outbox_* tables on Event.metadata

if TYPE_CHECKING:  # names resolved lazily below, spelled out for type checkers
    from outbox.broker import (
        Broker,
        get_default_broker,
        initialize,
        publish,
        publish_async,
        publish_sync,
        set_default_broker,
        subscribe,
    )
    from outbox.config import Config
    from outbox.consume import Consumer
    from outbox.providers.database import DatabaseProvider
    from outbox.providers.memory import MemoryProvider
    from outbox.providers.nats import NATSProvider
    from outbox.providers.redis import RedisProvider
    from outbox.relay import Relay


# name -> module that defines it. Imported on first access so that optional drivers (redis,
# nats, psycopg) are only needed by the code that uses them.
_LAZY: dict[str, str] = {
    "Broker": "outbox.broker",
    "initialize": "outbox.broker",
    "set_default_broker": "outbox.broker",
    "get_default_broker": "outbox.broker",
    "publish": "outbox.broker",
    "publish_sync": "outbox.broker",
    "publish_async": "outbox.broker",
    "subscribe": "outbox.broker",
    "Config": "outbox.config",
    "MemoryProvider": "outbox.providers.memory",
    "RedisProvider": "outbox.providers.redis",
    "NATSProvider": "outbox.providers.nats",
    "DatabaseProvider": "outbox.providers.database",
    "Relay": "outbox.relay",
    "Consumer": "outbox.consume",
}

# Names the package root no longer carries -> where they are now (still found, with a
# DeprecationWarning, so that code written against the older, larger root keeps working).
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        ("BrokerClosed", "BrokerNotStarted", "CaptureError", "ConfigError", "EventNotFound",
         "HandlerError", "MalformedMessage", "MissingDependency", "ProviderError",
         "ProviderFull", "ProviderUnavailable", "QueueFull", "SchemaMissing",
         "SerializationError", "UnsupportedOperation"),
        "outbox.exceptions"),
    **dict.fromkeys(("Operation", "event_type", "get_instance_id", "set_instance_id"),
                    "outbox.events"),
    "BrokerStats": "outbox.broker",
    "ProviderStats": "outbox.providers",
    "provider_from_config": "outbox.config",
    "sqlite_savepoints": "outbox.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        moved = _MOVED.get(name)
        if moved is None:
            if not name.startswith("_") and importlib.util.find_spec(f"outbox.{name}"):
                return importlib.import_module(f"outbox.{name}")  # a submodule: outbox.sqlite
            raise AttributeError(f"module 'outbox' has no attribute {name!r}")
        warnings.warn(f"outbox.{name} is {moved}.{name} now", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved), name)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Broker",
    "Capture",
    "Config",
    "Consumer",
    "DatabaseProvider",
    "Event",
    "EventFilter",
    "EventSource",
    "EventStatus",
    "MemoryProvider",
    "NATSProvider",
    "OutboxError",
    "RedisProvider",
    "Relay",
    "RetryPolicy",
    "capture",
    "context",
    "create_schema",
    "get_default_broker",
    "initialize",
    "new_event",
    "publish",
    "publish_async",
    "publish_sync",
    "request_scope",
    "set_context",
    "set_default_broker",
    "subscribe",
]

"""Transports and stores for events. Optional drivers are imported lazily."""

from outbox.providers.base import (
    Capabilities,
    Delivery,
    EventFilter,
    EventNotFound,
    Provider,
    ProviderStats,
    StartPosition,
    SupportsConsume,
    publish_many,
)

__all__ = [
    "Capabilities",
    "Delivery",
    "EventFilter",
    "EventNotFound",
    "Provider",
    "ProviderStats",
    "StartPosition",
    "SupportsConsume",
    "publish_many",
]

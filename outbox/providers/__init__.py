"""Transports and stores for events. Optional drivers are imported lazily.

The ports are in :mod:`outbox.providers.base`: :class:`Publisher`, :class:`Subscriber` (together
:class:`Provider`) and the optional :class:`EventStore`.
"""

from outbox.providers.base import (
    Capabilities,
    Delivery,
    EventFilter,
    EventNotFound,
    EventStore,
    GroupMember,
    Provider,
    ProviderStats,
    Publisher,
    StartPosition,
    Subscriber,
)

__all__ = [
    "Capabilities",
    "Delivery",
    "EventFilter",
    "EventNotFound",
    "EventStore",
    "GroupMember",
    "Provider",
    "ProviderStats",
    "Publisher",
    "StartPosition",
    "Subscriber",
]

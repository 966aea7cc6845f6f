"""The in-process broker and the module-level default broker.

- :mod:`outbox.broker.core` — :class:`Broker`, the worker pool, :class:`BrokerStats`;
- :mod:`outbox.broker.dispatch` — running the handlers of one event, :class:`DispatchResult`;
- :mod:`outbox.broker.subscriptions` — :class:`Subscription`, handler names and calls;
- :mod:`outbox.broker.default` — ``initialize``, ``get/set_default_broker``, ``publish*``,
  ``subscribe``.
"""

from outbox.broker.core import (
    NO_HANDLER_NOTE,
    NOTE_KEY,
    Broker,
    BrokerObserver,
    BrokerStats,
    StopReport,
)
from outbox.broker.default import (
    get_default_broker,
    initialize,
    publish,
    publish_async,
    publish_sync,
    set_default_broker,
    subscribe,
    unsubscribe,
)
from outbox.broker.dispatch import DispatchResult, joined_error
from outbox.broker.subscriptions import Handler, Subscription

__all__ = [
    "NOTE_KEY",
    "NO_HANDLER_NOTE",
    "Broker",
    "BrokerObserver",
    "BrokerStats",
    "DispatchResult",
    "Handler",
    "StopReport",
    "Subscription",
    "get_default_broker",
    "initialize",
    "joined_error",
    "publish",
    "publish_async",
    "publish_sync",
    "set_default_broker",
    "subscribe",
    "unsubscribe",
]

"""The module-level default broker: ``outbox.subscribe``, ``outbox.publish`` ….

``@outbox.subscribe("public.users.create")`` at import time of an app module registers the
handler in a process-wide registry and on the current default broker. Whenever a broker becomes
the default (:func:`set_default_broker`, :func:`initialize`), it receives every registered handler
under the same subscription id and name — so an app module imported before the relay or consumer
builds its broker still has its handlers run, and a module passed with ``--app`` after it works
too.

:func:`get_default_broker` creates a memory-provider broker lazily (not started: the relay,
a consumer or the app starts it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

from outbox._patterns import compile_pattern
from outbox.broker.core import Broker
from outbox.broker.subscriptions import Handler
from outbox.events import Event, set_instance_id

if TYPE_CHECKING:
    from outbox.config import Config
    from outbox.providers.base import Provider

__all__ = [
    "get_default_broker",
    "initialize",
    "publish",
    "publish_async",
    "publish_sync",
    "set_default_broker",
    "subscribe",
    "unsubscribe",
]


@dataclass(frozen=True, slots=True)
class _Registered:
    id: str
    pattern: str
    handler: Handler
    name: str
    threaded: bool | None


_lock = threading.RLock()
_default: Broker | None = None
_registry: dict[str, _Registered] = {}


def get_default_broker() -> Broker:
    """The default broker; created on first use (memory provider, defaults, not started)."""
    global _default
    broker = _default
    if broker is not None:
        return broker
    with _lock:
        if _default is None:
            _default = Broker()
            _adopt(_default)
        return _default


def set_default_broker(broker: Broker | None, *, inherit: bool = True) -> Broker | None:
    """Make ``broker`` the default and return the previous one (``None`` resets to lazy).

    With ``inherit`` (the default) the broker receives every handler registered with
    :func:`outbox.subscribe`.
    """
    global _default
    if broker is not None and not isinstance(broker, Broker):
        raise TypeError(f"expected an outbox.Broker, got {type(broker).__qualname__}")
    with _lock:
        previous = _default
        _default = broker
        if broker is not None and inherit:
            _adopt(broker)
    return previous


def initialize(config: Config | None = None, *, provider: Provider | None = None) -> Broker:
    """Build a broker from ``config`` (default: ``Config.load()``) and make it the default.

    The provider comes from :func:`outbox.config.provider_from_config` unless given. An explicit
    ``instance_id`` in the config becomes the process's instance id for new events too. The
    broker is returned not started: ``await broker.start()``.
    """
    from outbox.config import Config, provider_from_config

    if config is None:
        config = Config.load()
    if config.instance_id is not None:
        set_instance_id(config.instance_id)
    broker = Broker(
        provider if provider is not None else provider_from_config(config),
        mode=config.mode,
        worker_count=config.worker_count,
        buffer_size=config.buffer_size,
        retry_policy=config.retry_policy,
        instance_id=config.instance_id,
    )
    set_default_broker(broker)
    return broker


@overload
def subscribe(
    pattern: str, handler: None = None, *, name: str | None = None, threaded: bool | None = None
) -> Callable[[Handler], Handler]: ...


@overload
def subscribe(
    pattern: str, handler: Handler, *, name: str | None = None, threaded: bool | None = None
) -> str: ...


def subscribe(
    pattern: str,
    handler: Handler | None = None,
    *,
    name: str | None = None,
    threaded: bool | None = None,
) -> str | Callable[[Handler], Handler]:
    """Subscribe ``handler`` on the default broker (and every later default broker).

    Returns the subscription id; without ``handler``, a decorator returning the function.
    """
    if handler is None:
        compile_pattern(pattern)

        def decorator(func: Handler) -> Handler:
            subscribe(pattern, func, name=name, threaded=threaded)
            return func

        return decorator
    with _lock:
        broker = get_default_broker()
        sub = broker._add_subscription(pattern, handler, name=name, threaded=threaded)
        _registry[sub.id] = _Registered(sub.id, pattern, handler, sub.name, threaded)
    return sub.id


def unsubscribe(subscription: str) -> None:
    """Remove a subscription made with :func:`subscribe` (by id or name) everywhere."""
    with _lock:
        entry = _registry.get(subscription) or next(
            (r for r in _registry.values() if r.name == subscription), None
        )
        if entry is not None:
            del _registry[entry.id]
        broker = _default
        if broker is not None and (entry is None or broker.has_subscription(entry.id)):
            broker.unsubscribe(entry.id if entry is not None else subscription)
        elif entry is None:
            raise KeyError(f"no subscription {subscription!r}")


async def publish(event: Event) -> None:
    """``get_default_broker().publish(event)``."""
    await get_default_broker().publish(event)


async def publish_sync(event: Event) -> None:
    """``get_default_broker().publish_sync(event)``."""
    await get_default_broker().publish_sync(event)


async def publish_async(event: Event, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
    """``get_default_broker().publish_async(event, timeout=timeout)``."""
    await get_default_broker().publish_async(event, timeout=timeout)


def _adopt(broker: Broker) -> None:
    for entry in _registry.values():
        if not broker.has_subscription(entry.id):
            broker._add_subscription(
                entry.pattern, entry.handler, name=entry.name, threaded=entry.threaded,
                sub_id=entry.id, unique=True,
            )


def _snapshot() -> tuple[Broker | None, dict[str, _Registered]]:
    """State for the pytest plugin to restore after a test."""
    with _lock:
        return _default, dict(_registry)


def _restore(state: tuple[Broker | None, dict[str, _Registered]]) -> None:
    global _default
    with _lock:
        _default = state[0]
        _registry.clear()
        _registry.update(state[1])

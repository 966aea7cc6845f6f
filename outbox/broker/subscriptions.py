"""Subscriptions: a pattern, a handler, and the stable name that identifies the handler.

The name is what the relay records per-handler progress under (in event metadata), so it must be
the same after a restart: by default it is ``module.qualname`` of the handler, with ``#2``, ``#3``
… appended when one broker holds several subscriptions of the same handler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import anyio.to_thread

from outbox._patterns import Pattern
from outbox.events import Event

__all__ = ["Handler", "Subscription", "call_handler", "default_name", "is_async_handler"]

#: ``handler(event)``: a plain function or a coroutine function (its result is ignored).
Handler: TypeAlias = Callable[[Event], Any]


@dataclass(frozen=True, slots=True)
class Subscription:
    """One registered handler. ``threaded``: a sync handler that runs in a worker thread."""

    id: str
    pattern: Pattern
    name: str
    handler: Handler
    is_async: bool
    threaded: bool

    def __repr__(self) -> str:
        return f"<Subscription {self.name} pattern={self.pattern.text!r} id={self.id}>"


def default_name(handler: Handler) -> str:
    """``module.qualname`` of the handler (of the wrapped function for ``functools.partial``)."""
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def is_async_handler(handler: Handler) -> bool:
    """True for coroutine functions and objects whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


async def call_handler(sub: Subscription, event: Event) -> None:
    """One attempt of ``sub`` on ``event``; exceptions propagate to the caller.

    Sync handlers run in a worker thread when ``sub.threaded`` (the event loop stays free while
    they block; cancellation abandons the thread, which finishes on its own), inline otherwise.
    A sync handler that returns an awaitable has it awaited.
    """
    if sub.is_async:
        await sub.handler(event)
        return
    if sub.threaded:
        result = await anyio.to_thread.run_sync(sub.handler, event, abandon_on_cancel=True)
    else:
        result = sub.handler(event)
    if inspect.isawaitable(result):
        await _await(result)


async def _await(result: Awaitable[Any]) -> None:
    await result

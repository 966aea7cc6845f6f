"""``eventually``: wait for a condition instead of sleeping and hoping; and the two ways tests
read a consumer-group member (``take``, ``nothing_more``).

Tests synchronise with other tasks, threads, processes and servers by polling an observable
condition with a deadline: ``await eventually(lambda: relay.stats.completed == 3)``. On time out
the test fails with an :class:`AssertionError` that names what it waited for (``what``; a
callable is called then, to show the state it ended in). Sleeps stay only where the time itself is
under test (a lease running out, a window in which nothing may arrive, a handler that is slow).

:func:`eventually` is for async tests (it sleeps with anyio between looks), and
:func:`eventually_sync` the same for plain functions and worker threads.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import pytest

from outbox.providers.base import Delivery, GroupMember

__all__ = ["eventually", "eventually_sync", "nothing_more", "take"]

T = TypeVar("T")

#: Seconds a condition may take before the test fails (servers on loopback, 2 shared cores).
WITHIN = 30.0
#: Seconds between looks.
EVERY = 0.02


def _timed_out(within: float, what: str | Callable[[], str]) -> AssertionError:
    detail = what() if callable(what) else what
    return AssertionError(f"timed out after {within:g} s waiting for {detail}")


async def eventually(condition: Callable[[], T | Awaitable[T]], *, within: float = WITHIN,
                     every: float = EVERY,
                     what: str | Callable[[], str] = "the condition") -> T:
    """Look at ``condition()`` (a value or an awaitable) every ``every`` seconds until it is
    truthy and return it; fail after ``within`` seconds (see the module docstring)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(within, what)
        await anyio.sleep(every)


def eventually_sync(condition: Callable[[], T], *, within: float = WITHIN, every: float = EVERY,
                    what: str | Callable[[], str] = "the condition") -> T:
    """:func:`eventually` for code that cannot await (blocks the calling thread)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(within, what)
        time.sleep(every)


async def take(member: GroupMember, n: int, *, ack: bool = True,
               within: float = 15.0) -> list[Delivery]:
    """The next ``n`` deliveries of ``member`` (acknowledged unless ``ack=False``)."""
    got: list[Delivery] = []
    with anyio.fail_after(within):
        while len(got) < n:
            delivery = await member.__anext__()
            if ack:
                await delivery.ack()
            got.append(delivery)
    return got


async def nothing_more(member: GroupMember, wait: float = 0.8) -> None:
    """Fails when ``member`` hands out anything within ``wait`` seconds (a window in which
    nothing may arrive: the time itself is under test)."""
    with anyio.move_on_after(wait):
        extra = await member.__anext__()
        pytest.fail(f"unexpected delivery {extra!r}")

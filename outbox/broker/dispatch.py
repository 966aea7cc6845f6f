"""Running the handlers of one event: attempts, retries with backoff, one result per handler.

First attempts run one handler after the other, in subscription order, without creating tasks
(the common case costs no more than the calls themselves). Handlers that failed and have attempts
left are retried concurrently, each with its own backoff, so one slow retry schedule does not
delay the others. A failing handler never stops the others.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread

from outbox._retry import RetryPolicy
from outbox.broker.subscriptions import Subscription, call_handler
from outbox.events import Event
from outbox.exceptions import BrokerClosed

__all__ = ["DispatchResult", "joined_error", "run_blocking", "run_subscriptions"]

log = logging.getLogger("outbox.broker")


@dataclass(slots=True)
class DispatchResult:
    """What happened to each handler matching an event.

    ``succeeded``/``skipped`` hold handler names (``skipped``: named in ``done``), ``failed`` maps
    a handler name to the exception of its last attempt, ``matched`` counts every matching
    subscription (including skipped ones). ``interrupted``: retries were cut short because the
    broker stopped (those handlers are in ``failed`` with a :class:`BrokerClosed`).
    """

    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, BaseException] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    matched: int = 0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when no handler failed (also when none matched)."""
        return not self.failed


def joined_error(failed: dict[str, BaseException]) -> str:
    """``name: Type: message; …`` — the text stored in an event's ``error``."""
    return "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failed.items())


async def run_subscriptions(
    subs: Sequence[Subscription],
    event: Event,
    *,
    attempts: int,
    policy: RetryPolicy,
    done: Collection[str] = (),
    retry_scopes: set[anyio.CancelScope] | None = None,
    final_level: int = logging.WARNING,
) -> DispatchResult:
    """Run every subscription of ``subs`` not named in ``done``, each up to ``attempts`` times.

    Retry sleeps follow ``policy``; with ``attempts == 1`` nothing sleeps. The retry phase runs
    in a cancel scope added to ``retry_scopes`` so a stopping broker can cut it short. A last
    failed attempt is logged at ``final_level`` with its traceback (ERROR when the event fails
    for good; the relay, which retries later itself, keeps WARNING).
    """
    result = DispatchResult(matched=len(subs))
    failing: list[tuple[Subscription, Exception]] = []
    for sub in subs:
        if done and sub.name in done:
            result.skipped.append(sub.name)
            continue
        try:
            if sub.is_async:  # the common case, without the extra coroutine of call_handler
                await sub.handler(event)
            else:
                await call_handler(sub, event)
        except Exception as exc:
            _log_failure(sub, event, exc, 1, attempts, final_level)
            failing.append((sub, exc))
        else:
            result.succeeded.append(sub.name)
    if not failing:
        return result
    if attempts <= 1:
        result.failed.update((sub.name, error) for sub, error in failing)
        return result

    last: dict[str, BaseException] = {sub.name: first for sub, first in failing}

    async def retry(sub: Subscription) -> None:
        for attempt in range(2, attempts + 1):
            await anyio.sleep(policy.delay(attempt - 1))
            try:
                await call_handler(sub, event)
            except Exception as error:
                _log_failure(sub, event, error, attempt, attempts, final_level)
                last[sub.name] = error
            else:
                del last[sub.name]
                result.succeeded.append(sub.name)
                return

    scope = anyio.CancelScope()
    if retry_scopes is not None:
        retry_scopes.add(scope)
    try:
        with scope:
            async with anyio.create_task_group() as tg:
                for sub, _ in failing:
                    tg.start_soon(retry, sub)
    finally:
        if retry_scopes is not None:
            retry_scopes.discard(scope)
    if scope.cancelled_caught:
        result.interrupted = True
        for name in last:
            last[name] = BrokerClosed(f"broker stopped before handler {name} succeeded")
    result.failed.update(last)
    return result


def run_blocking(
    subs: Sequence[Subscription], event: Event, *, done: Collection[str] = ()
) -> DispatchResult:
    """One attempt of each sync subscription of ``subs`` not named in ``done``, in the calling
    thread: :func:`run_subscriptions` with ``attempts=1`` for a worker thread that runs many
    events' handlers in one hop from the event loop (the relay, see ``outbox/relay/dispatch.py``).
    A handler that returns an awaitable has it awaited on the event loop."""
    result = DispatchResult(matched=len(subs))
    for sub in subs:
        if done and sub.name in done:
            result.skipped.append(sub.name)
            continue
        try:
            value = sub.handler(event)
            if inspect.isawaitable(value):
                anyio.from_thread.run(_await, value)
        except Exception as exc:
            _log_failure(sub, event, exc, 1, 1, logging.WARNING)
            result.failed[sub.name] = exc
        else:
            result.succeeded.append(sub.name)
    return result


async def _await(value: Awaitable[Any]) -> None:
    await value


def _log_failure(
    sub: Subscription, event: Event, exc: Exception, attempt: int, attempts: int, level: int
) -> None:
    final = attempt >= attempts
    log.log(
        level if final else logging.WARNING,
        "handler %s failed on event %s (%s), attempt %d/%d%s: %s: %s",
        sub.name, event.id, event.type, attempt, attempts,
        "" if final else ", will retry", type(exc).__name__, exc,
        exc_info=exc if final else None,
    )

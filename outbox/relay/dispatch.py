"""One batch of claimed events → local handlers → provider → one :class:`Outcome` per event.

Order: events are grouped into *lanes*, one per ordering key (an event without a key is a lane of
its own). A lane's events go to the handlers one at a time in ``seq`` order; lanes run
concurrently (``concurrency``). Events whose handlers all succeeded are then forwarded to the
provider in *rounds* — round ``r`` holds the ``r``-th event of every lane — so an event reaches
the provider only after the earlier events of its key were accepted.

When an event fails (a handler raised, or the provider refused that event) the later events of
its lane are handed back (released, not a retry): they wait behind the failing event, which keeps
the key's order across retries.

Lanes whose handlers are all sync handlers meant for a worker thread (a plain ``def``, the
default) run in a few worker threads that take lane after lane — one thread hop per thread and
batch, not one per event (``Dispatcher._in_threads``); the other lanes run on the event loop.

Partial success: the names of the handlers that already succeeded for an event are kept in
``metadata["outbox"]["handled"]`` when the event goes back to ``pending``, and those handlers are
skipped on the next attempt. Only the handlers that failed (and the provider) see a repeat.

A provider outage (:class:`ProviderUnavailable`) is not the events' fault: every event not
yet forwarded is released without counting a retry, and the outage is reported to the caller.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread

from outbox._logs import event_context
from outbox._retry import RetryPolicy
from outbox._sql.relay import COMPLETED, FAILED, PENDING, Outcome
from outbox._tracing import continue_trace, set_error
from outbox.events import Event
from outbox.exceptions import ProviderUnavailable
from outbox.providers.base import Publisher

__all__ = ["BatchResult", "Dispatcher", "handled_names", "lanes"]

#: Seconds every handler thread of a batch must have been in one event before another joins.
_GROW_AFTER = 0.02
_META_KEY = "outbox"
_HANDLED = "handled"
_MAX_ERROR = 4000


class _Broker(Protocol):
    async def dispatch(
        self, event: Event, *, done: Sequence[str] = ..., attempts: int = ...
    ) -> Any: ...

    def threaded_only(self, event_type: str) -> bool: ...

    def dispatch_blocking(self, event: Event, *, done: Sequence[str] = ...) -> Any: ...

    def dispatched(self, event: Event, result: Any, seconds: float) -> None: ...


def handled_names(event: Event) -> tuple[str, ...]:
    """Handlers recorded as already succeeded for ``event`` (partial success of a retry)."""
    meta = event.meta or {}
    section = meta.get(_META_KEY)
    if isinstance(section, dict):
        names = section.get(_HANDLED)
        if isinstance(names, list):
            return tuple(str(n) for n in names)
    return ()


def _with_handled(event: Event, names: Sequence[str]) -> dict[str, Any]:
    meta = copy.deepcopy(event.meta) if event.meta else {}
    section = meta.get(_META_KEY)
    section = dict(section) if isinstance(section, dict) else {}
    section[_HANDLED] = sorted(set(names))
    meta[_META_KEY] = section
    return meta


def lanes(events: Sequence[Event]) -> list[list[Event]]:
    """Group ``events`` (in seq order) by ordering key; keyless events get a lane each."""
    by_key: dict[str, list[Event]] = {}
    out: list[list[Event]] = []
    for event in events:
        key = event.ordering_key
        if key is None:
            out.append([event])
            continue
        lane = by_key.get(key)
        if lane is None:
            lane = by_key[key] = []
            out.append(lane)
        lane.append(event)
    return out


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


@dataclass(slots=True)
class BatchResult:
    """Outcomes of a batch (every event settled exactly once once the batch is done)."""

    outcomes: dict[Any, Outcome] = field(default_factory=dict)
    outage: BaseException | None = None
    handled: int = 0
    forwarded: int = 0
    handler_errors: int = 0
    forward_errors: int = 0
    first_forward_error: BaseException | None = None

    def release_rest(self, events: Sequence[Event]) -> None:
        """Give back every event that has no outcome yet (unstarted; no retry counted)."""
        for event in events:
            if event.id not in self.outcomes:
                self.outcomes[event.id] = Outcome(event, PENDING)


class Dispatcher:
    """Runs a batch through the broker's local handlers and the provider (see module doc)."""

    def __init__(
        self,
        broker: _Broker | None,
        provider: Publisher | None,
        *,
        retry_policy: RetryPolicy,
        now: Callable[[], dt.datetime],
        concurrency: int = 8,
    ) -> None:
        self.broker = broker
        self.provider = provider
        self.retry_policy = retry_policy
        self.now = now
        self.concurrency = max(1, concurrency)

    async def run(self, events: Sequence[Event], result: BatchResult) -> None:
        """Fill ``result.outcomes`` for ``events``; on cancellation the caller releases the rest."""
        all_lanes = lanes(events)
        # per lane: events whose handlers all succeeded, with their handled names
        ready: list[list[tuple[Event, tuple[str, ...]]]] = [[] for _ in all_lanes]
        if self.broker is None:
            for i, lane in enumerate(all_lanes):
                ready[i] = [(e, handled_names(e)) for e in lane]
            await self._forward(ready, all_lanes, result)
            return
        broker = self.broker
        threaded: list[int] = []
        on_loop: list[int] = []
        for i, lane in enumerate(all_lanes):
            (threaded if all(broker.threaded_only(e.type) for e in lane) else on_loop).append(i)
        if not threaded and (self.concurrency == 1 or len(all_lanes) == 1):
            for i, lane in enumerate(all_lanes):
                await self._lane(lane, ready[i], result)
        elif not threaded:
            await self._on_loop(on_loop, all_lanes, ready, result)
        else:
            async with anyio.create_task_group() as tg:
                if on_loop:
                    tg.start_soon(self._on_loop, on_loop, all_lanes, ready, result)
                await self._in_threads(threaded, all_lanes, ready, result)
        await self._forward(ready, all_lanes, result)

    async def _on_loop(
        self, indexes: Sequence[int], all_lanes: list[list[Event]],
        ready: list[list[tuple[Event, tuple[str, ...]]]], result: BatchResult,
    ) -> None:
        """Lanes on the event loop, ``concurrency`` at a time."""
        index = iter(indexes)

        async def worker() -> None:
            for i in index:
                await self._lane(all_lanes[i], ready[i], result)

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.concurrency, len(indexes))):
                tg.start_soon(worker)

    async def _in_threads(
        self, indexes: Sequence[int], all_lanes: list[list[Event]],
        ready: list[list[tuple[Event, tuple[str, ...]]]], result: BatchResult,
    ) -> None:
        """Lanes whose handlers are all sync and threaded: worker threads take lanes one after
        the other and run them as :meth:`_lane` does — one thread hop per worker and batch, not
        one per event; the event loop stays free (leases, wake-ups, the next claim).

        One worker to start with (threads that only compete for the GIL are slower than one);
        another joins, up to ``concurrency``, whenever every worker has been in one event's
        handlers for ``_GROW_AFTER`` seconds — handlers that block (I/O, sleeps) then run
        ``concurrency`` lanes at a time, as on the event loop.

        Cancelled (shutdown timeout): the threads finish the handler they are in and take nothing
        more; outcomes they reach after that are not recorded (the caller hands those events
        back), as with a single abandoned handler thread."""
        assert self.broker is not None
        broker = self.broker
        lock = threading.Lock()
        stopped = False
        pending = iter(indexes)
        taken = 0
        reports: list[tuple[Event, Any, float]] = []
        since: list[float] = []  # per worker: when its current event started (0: finished)

        def record(apply: Callable[..., None], *args: Any) -> bool:
            with lock:
                if stopped:
                    return False
                apply(*args)
                return True

        def worker(n: int) -> None:
            nonlocal taken
            while True:
                with lock:
                    i = None if stopped else next(pending, None)
                    taken += 1
                if i is None:
                    since[n] = 0.0
                    return
                self._lane_blocking(broker, all_lanes[i], ready[i], result, record, reports,
                                    since, n)

        running = 0
        limit = min(self.concurrency, len(indexes))

        try:
            async with anyio.create_task_group() as tg:

                async def run_worker(n: int) -> None:
                    nonlocal running
                    try:
                        await anyio.to_thread.run_sync(functools.partial(worker, n),
                                                       abandon_on_cancel=True)
                    finally:
                        running -= 1
                        if not running:  # it found no lane left: every lane is taken
                            grow.cancel()

                def spawn() -> None:
                    nonlocal running
                    running += 1
                    since.append(time.perf_counter())
                    tg.start_soon(run_worker, len(since) - 1)

                with anyio.CancelScope() as grow:
                    spawn()
                    while len(since) < limit:
                        await anyio.sleep(_GROW_AFTER)
                        if taken >= len(indexes):
                            break  # every lane is taken: no new worker would get one
                        now = time.perf_counter()
                        if all(now - t >= _GROW_AFTER for t in since if t):
                            spawn()
        finally:
            with lock:
                stopped = True
                done = list(reports)
            for event, res, seconds in done:
                broker.dispatched(event, res, seconds)

    def _lane_blocking(
        self, broker: _Broker, lane: list[Event], ready: list[tuple[Event, tuple[str, ...]]],
        result: BatchResult, record: Callable[..., bool],
        reports: list[tuple[Event, Any, float]], since: list[float], n: int,
    ) -> None:
        """:meth:`_lane` in a worker thread; every change to ``result`` goes through ``record``
        (under the batch's lock, refused once the batch was cancelled)."""
        for position, event in enumerate(lane):
            done = handled_names(event)
            since[n] = started = time.perf_counter()
            try:
                with event_context(event), continue_trace(event) as span:
                    res = broker.dispatch_blocking(event, done=done)
                    if not res.ok:
                        set_error(span, "handler failed: " + ", ".join(res.failed))
            except Exception as exc:  # the broker itself failed: the whole event failed
                record(self._broken, lane, position, f"dispatch: {_describe(exc)}", done, result)
                return
            seconds = time.perf_counter() - started
            if not record(self._settled_in_lane, lane, position, res, done, ready, result,
                          reports, seconds):
                return
            if not res.ok:
                return

    async def _lane(
        self, lane: list[Event], ready: list[tuple[Event, tuple[str, ...]]], result: BatchResult
    ) -> None:
        assert self.broker is not None
        for position, event in enumerate(lane):
            done = handled_names(event)
            try:
                # Log records carry the event's id/type/seq; handlers continue its trace.
                with event_context(event), continue_trace(event) as span:
                    res = await self.broker.dispatch(event, done=done, attempts=1)
                    if not res.ok:
                        set_error(span, "handler failed: " + ", ".join(res.failed))
            except Exception as exc:  # the broker itself failed: the whole event failed
                self._broken(lane, position, f"dispatch: {_describe(exc)}", done, result)
                return
            self._settled_in_lane(lane, position, res, done, ready, result)
            if not res.ok:
                return

    def _settled_in_lane(
        self, lane: list[Event], position: int, res: Any, done: tuple[str, ...],
        ready: list[tuple[Event, tuple[str, ...]]], result: BatchResult,
        reports: list[tuple[Event, Any, float]] | None = None, seconds: float = 0.0,
    ) -> None:
        """Record the handlers' result for ``lane[position]``: ready to forward, or failed and
        the rest of its lane held back."""
        event = lane[position]
        if reports is not None:
            reports.append((event, res, seconds))
        names = (*done, *res.succeeded)
        if res.ok:
            result.handled += 1
            ready.append((event, names))
            return
        result.handler_errors += 1
        error = "; ".join(f"{name}: {_describe(exc)}" for name, exc in res.failed.items())
        self._broken(lane, position, error or "handler failed", names, result)

    def _broken(self, lane: list[Event], position: int, error: str, names: Sequence[str],
                result: BatchResult) -> None:
        """``lane[position]`` failed: a retry (or final failure); the rest of its lane waits."""
        self._fail(lane[position], error, names, result)
        self._hold(lane[position + 1:], result)

    async def _forward(
        self,
        ready: list[list[tuple[Event, tuple[str, ...]]]],
        all_lanes: list[list[Event]],
        result: BatchResult,
    ) -> None:
        if self.provider is None:
            for lane in ready:
                for event, _ in lane:
                    result.outcomes[event.id] = Outcome(event, COMPLETED)
            return
        blocked: set[int] = set()  # lanes with a refused event: their later events wait
        depth = max((len(lane) for lane in ready), default=0)
        for r in range(depth):
            round_items = [(i, lane[r]) for i, lane in enumerate(ready)
                           if r < len(lane) and i not in blocked]
            if not round_items:
                continue
            events = [event for _, (event, _) in round_items]
            try:
                errors = await self.provider.publish_many(events)
            except ProviderUnavailable as exc:
                result.outage = exc
                self._release_unforwarded(ready, result)
                return
            except Exception as exc:  # a provider bug: count it against these events
                errors = [exc] * len(events)
            for (i, (event, names)), error in zip(round_items, errors, strict=True):
                if error is None:
                    result.forwarded += 1
                    result.outcomes[event.id] = Outcome(event, COMPLETED)
                    continue
                result.forward_errors += 1
                result.first_forward_error = result.first_forward_error or error
                blocked.add(i)
                self._fail(event, f"forward: {_describe(error)}", names, result)
        self._release_unforwarded(ready, result)

    def _release_unforwarded(
        self, ready: list[list[tuple[Event, tuple[str, ...]]]], result: BatchResult
    ) -> None:
        for lane in ready:
            for event, names in lane:
                if event.id not in result.outcomes:
                    meta = _with_handled(event, names) if names != handled_names(event) else None
                    result.outcomes[event.id] = Outcome(event, PENDING, meta=meta)

    def _hold(self, events: Sequence[Event], result: BatchResult) -> None:
        for event in events:
            result.outcomes[event.id] = Outcome(event, PENDING)

    def _fail(self, event: Event, error: str, names: Sequence[str], result: BatchResult) -> None:
        failures = event.retry_count + 1
        meta = _with_handled(event, names) if tuple(names) != handled_names(event) else None
        if self.retry_policy.exhausted(failures):
            result.outcomes[event.id] = Outcome(
                event, FAILED, error=error, retry_count=failures, meta=meta
            )
            return
        delay = self.retry_policy.delay(failures)
        result.outcomes[event.id] = Outcome(
            event,
            PENDING,
            error=error,
            retry_count=failures,
            next_attempt_at=self.now() + dt.timedelta(seconds=delay),
            meta=meta,
        )

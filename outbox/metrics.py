"""Prometheus metrics of the broker and the relay.

:class:`Metrics` owns every collector, registered on the ``registry`` you pass (default:
``prometheus_client.REGISTRY``, so an application's own ``/metrics`` shows them too). The broker
and the relay call its small ``record`` methods; :class:`BacklogSampler` refreshes the table
gauges (backlog, lag) from one cheap indexed query every few seconds — never per event.

Names (all ``eventbroker_``; dashboards and alerts depend on them, keep them)::

    eventbroker_events_published_total{source,type}             counter: events published
    eventbroker_events_processed_total{source,type,status}      counter: events handled, by outcome
    eventbroker_event_processing_duration_seconds{source,type}  histogram: 1 ms to 30 s
    eventbroker_queue_size                                      gauge: async broker queue length
    eventbroker_workers_active                                  gauge: busy async workers
    eventbroker_relay_events_claimed_total                      counter: events claimed
    eventbroker_relay_events_forwarded_total                    counter: accepted by the provider
    eventbroker_relay_forward_errors_total{reason}              counter: unavailable | event
    eventbroker_relay_events_retried_total                      counter: put back for a retry
    eventbroker_relay_events_failed_total                       counter: dead, past max_retries
    eventbroker_relay_claim_duration_seconds                    histogram: claim transaction
    eventbroker_relay_backlog_events{status}                    gauge: pending|processing|failed
    eventbroker_relay_blocked_keys                              gauge: keys held by a failed head
    eventbroker_relay_oldest_pending_age_seconds                gauge: the outbox lag
    eventbroker_relay_provider_up                               gauge: 1 reachable, 0 outage
    eventbroker_relay_backlog_errors_total                      counter: failed backlog queries

Label cardinality is bounded: ``type`` is ``schema.entity.operation`` (never an id); past
``max_types`` distinct types (default 1000) further types are counted as ``other``; unknown
sources and statuses are ``other`` too.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from outbox.events import EventSource, EventStatus, utcnow
from outbox.ops import Backlog, backlog

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from outbox.events import Event

__all__ = [
    "CLAIM_BUCKETS",
    "DURATION_BUCKETS",
    "OTHER",
    "BacklogSampler",
    "BrokerMetrics",
    "Metrics",
    "RelayMetrics",
    "get_metrics",
]

log = logging.getLogger(__name__)

#: Processing-duration buckets: 1 ms to 30 s.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
#: Claim-duration buckets: 0.5 ms to 5 s (a claim is one short transaction).
CLAIM_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
#: Label value standing for everything past the cardinality bound.
OTHER = "other"

_SOURCES = frozenset(s.value for s in EventSource)
_STATUSES = frozenset(s.value for s in EventStatus)
_BACKLOG_STATUSES = ("pending", "processing", "failed")
_FORWARD_REASONS = frozenset({"unavailable", "event"})


class Metrics:
    """Every outbox collector on one registry, with cheap per-event record methods.

    One instance per registry (a second one on the same registry is a duplicate-registration
    error from prometheus-client; use :func:`get_metrics` to share). Record methods are
    thread-safe and cost about a microsecond: label children are cached per label set.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_types: int = 1000
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.max_types = max_types
        self._types: set[str] = set()
        self._types_lock = threading.Lock()
        reg = self.registry
        # -- the broker
        self.published = Counter(
            "eventbroker_events_published", "Events published.", ["source", "type"], registry=reg
        )
        self.processed = Counter(
            "eventbroker_events_processed",
            "Events handled, by final status of the attempt (completed, failed, retry).",
            ["source", "type", "status"],
            registry=reg,
        )
        self.duration = Histogram(
            "eventbroker_event_processing_duration_seconds",
            "Time spent handling one event (handlers and forwarding).",
            ["source", "type"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.queue_size = Gauge(
            "eventbroker_queue_size", "Events waiting in the async broker's queue.", registry=reg
        )
        self.workers_active = Gauge(
            "eventbroker_workers_active", "Async broker workers handling an event.", registry=reg
        )
        # -- relay
        self.claimed = Counter(
            "eventbroker_relay_events_claimed", "Events claimed by the relay.", registry=reg
        )
        self.forwarded = Counter(
            "eventbroker_relay_events_forwarded",
            "Events the provider accepted from the relay.",
            registry=reg,
        )
        self.forward_errors = Counter(
            "eventbroker_relay_forward_errors",
            "Forwarding errors: 'unavailable' (provider outage, no event is charged) or "
            "'event' (an error about one event, counted against its retries).",
            ["reason"],
            registry=reg,
        )
        self.retried = Counter(
            "eventbroker_relay_events_retried",
            "Events put back to pending for another attempt.",
            registry=reg,
        )
        self.dead = Counter(
            "eventbroker_relay_events_failed",
            "Events marked failed after max_retries (replay them with `python -m outbox replay`).",
            registry=reg,
        )
        self.claim_duration = Histogram(
            "eventbroker_relay_claim_duration_seconds",
            "Duration of one claim transaction.",
            buckets=CLAIM_BUCKETS,
            registry=reg,
        )
        self.backlog = Gauge(
            "eventbroker_relay_backlog_events",
            "Events in the table by unfinished status (sampled every few seconds).",
            ["status"],
            registry=reg,
        )
        self.blocked_keys = Gauge(
            "eventbroker_relay_blocked_keys",
            "Ordering keys whose head event failed; their later events wait for a replay.",
            registry=reg,
        )
        self.lag = Gauge(
            "eventbroker_relay_oldest_pending_age_seconds",
            "Age of the oldest undelivered (pending or processing) event: the outbox lag.",
            registry=reg,
        )
        self.provider_up = Gauge(
            "eventbroker_relay_provider_up",
            "1 while the provider answers, 0 during an outage.",
            registry=reg,
        )
        self.backlog_errors = Counter(
            "eventbroker_relay_backlog_errors",
            "Backlog queries that failed (database unreachable).",
            registry=reg,
        )
        for status in _BACKLOG_STATUSES:
            self.backlog.labels(status)
        for reason in sorted(_FORWARD_REASONS):
            self.forward_errors.labels(reason)
        self._published: dict[tuple[str, str], Any] = {}
        self._processed: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    # -- label hygiene ---------------------------------------------------------------------------

    def _type(self, type_: str) -> str:
        if type_ in self._types:
            return type_
        with self._types_lock:
            if len(self._types) >= self.max_types:
                return OTHER
            self._types.add(type_)
        return type_

    def _cache(self, cache: dict[Any, Any], key: Any, child: Any) -> Any:
        # Raw keys past the bound all map to 'other' children: do not let the cache grow with them.
        if len(cache) < 4 * self.max_types + 64:
            cache[key] = child
        return child

    @staticmethod
    def _source(source: str) -> str:
        return source if source in _SOURCES else OTHER

    # -- broker ------------------------------------------------------------------------------------

    def event_published(self, source: str, type: str, count: int = 1) -> None:
        """``count`` events of ``type`` from ``source`` were published."""
        key = (source, type)
        child = self._published.get(key)
        if child is None:
            child = self._cache(
                self._published, key, self.published.labels(self._source(source), self._type(type))
            )
        child.inc(count)

    def event_processed(
        self, source: str, type: str, status: str, duration: float | None = None,
        *, count: int = 1,
    ) -> None:
        """``count`` events were handled with outcome ``status`` (one took ``duration`` s)."""
        key = (source, type, status)
        child = self._processed.get(key)
        if child is None:
            label = status if status in _STATUSES or status == "retry" else OTHER
            child = self._cache(
                self._processed,
                key,
                self.processed.labels(self._source(source), self._type(type), label),
            )
        child.inc(count)
        if duration is not None:
            dkey = (source, type)
            hist = self._durations.get(dkey)
            if hist is None:
                hist = self._cache(
                    self._durations,
                    dkey,
                    self.duration.labels(self._source(source), self._type(type)),
                )
            hist.observe(duration)

    def observe_published(self, event: Event) -> None:
        """:meth:`event_published` for one :class:`~outbox.Event`."""
        self.event_published(event.source, event.type)

    def observe_processed(self, event: Event, status: str, duration: float | None = None) -> None:
        """:meth:`event_processed` for one :class:`~outbox.Event`."""
        self.event_processed(event.source, event.type, status, duration)

    def observe_duration(self, event: Event, duration: float) -> None:
        """Handling time of one event whose outcome is counted elsewhere (the relay settles)."""
        key = (event.source, event.type)
        hist = self._durations.get(key)
        if hist is None:
            hist = self._cache(
                self._durations,
                key,
                self.duration.labels(self._source(event.source), self._type(event.type)),
            )
        hist.observe(duration)

    def attach_broker(self, broker: Any) -> BrokerMetrics:
        """Count ``broker``'s publishes and outcomes, and export its queue gauges.

        The queue gauges are read at scrape time (no per-event cost). Returns the observer (pass
        it to ``broker.remove_observer`` to detach).
        """
        observer = BrokerMetrics(self)
        broker.add_observer(observer)
        self.queue_size.set_function(lambda: broker.queue_size)
        self.workers_active.set_function(lambda: broker.workers_active)
        return observer

    def set_queue(self, size: int, workers_active: int) -> None:
        """The async broker's queue length and busy workers."""
        self.queue_size.set(size)
        self.workers_active.set(workers_active)

    # -- relay -------------------------------------------------------------------------------------

    def events_claimed(self, count: int, duration: float | None = None) -> None:
        """One claim transaction took ``count`` events in ``duration`` seconds."""
        if count:
            self.claimed.inc(count)
        if duration is not None:
            self.claim_duration.observe(duration)

    def events_forwarded(self, count: int) -> None:
        if count:
            self.forwarded.inc(count)

    def forward_error(self, reason: str, count: int = 1) -> None:
        """``reason``: ``unavailable`` (provider outage) or ``event`` (about one event)."""
        if reason not in _FORWARD_REASONS:
            raise ValueError(f"forward_error reason must be one of {sorted(_FORWARD_REASONS)}")
        self.forward_errors.labels(reason).inc(count)

    def events_retried(self, count: int) -> None:
        if count:
            self.retried.inc(count)

    def events_dead(self, count: int) -> None:
        """Events marked ``failed`` after their last attempt."""
        if count:
            self.dead.inc(count)

    def set_provider_up(self, up: bool) -> None:
        self.provider_up.set(1 if up else 0)

    def set_backlog(self, value: Backlog, now: Any = None) -> None:
        """Publish a :class:`~outbox.ops.Backlog` sample into the table gauges."""
        self.backlog.labels("pending").set(value.pending)
        self.backlog.labels("processing").set(value.processing)
        self.backlog.labels("failed").set(value.failed)
        self.blocked_keys.set(value.blocked_keys)
        self.lag.set(value.lag_seconds(now or utcnow()))


class BrokerMetrics:
    """A broker observer (``broker.add_observer``) feeding :class:`Metrics`.

    ``on_processed`` counts the outcome of events the broker published and processed itself;
    ``on_dispatched`` (the relay and consumers calling ``broker.dispatch``) only times the
    handlers, because the relay counts the outcome when it settles the event.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_published(self, broker: Any, event: Event) -> None:
        self.metrics.observe_published(event)

    def on_processed(self, broker: Any, event: Event, status: str, duration: float) -> None:
        self.metrics.observe_processed(event, status, duration)

    def on_dispatched(self, broker: Any, event: Event, result: Any, duration: float) -> None:
        self.metrics.observe_duration(event, duration)


class RelayMetrics:
    """Relay hooks (``Relay(hooks=[...])`` / ``relay.hooks``) feeding :class:`Metrics`.

    Counts claims (and their duration), outcomes by status (``completed``, ``failed``, and
    ``retry`` for an event put back for another attempt), events forwarded to the provider (also
    as ``eventbroker_events_published_total{source,type}``: the relay publishes them), forwarding
    errors and outages. With a ``state`` (:class:`outbox.health.HealthState`) it also reports
    the relay's own readiness as the check ``relay``. The broker the relay uses is attached on
    the first claim, so handler durations are timed too.
    """

    def __init__(self, metrics: Metrics, relay: Any = None, state: Any = None) -> None:
        self.metrics = metrics
        self.relay = relay
        self.state = state
        self._forwarded = 0
        self._broker_attached = relay is None

    def _attach_broker(self) -> None:
        self._broker_attached = True
        broker = getattr(self.relay, "broker", None)
        if broker is not None and hasattr(broker, "add_observer"):
            self.metrics.attach_broker(broker)

    def on_claim(self, claim: Any) -> None:
        if not self._broker_attached:
            self._attach_broker()
        self.metrics.events_claimed(len(claim.events), claim.seconds)

    def on_settled(self, outcomes: Any, lost: int) -> None:
        m = self.metrics
        # Count per label set first, then one inc per set: a batch has few distinct types.
        counts: dict[tuple[str, str, str], int] = {}
        for o in outcomes:
            status = o.status
            if status == "pending":
                if o.retry_count is None:
                    continue  # handed back unstarted (shutdown, key held back): no attempt
                status = "retry"
            event = o.event
            key = (event.source, event.type, status)
            counts[key] = counts.get(key, 0) + 1
        has_provider = getattr(self.relay, "provider", None) is not None
        retried = dead = 0
        for (source, type_, status), n in counts.items():
            m.event_processed(source, type_, status, count=n)
            if status == "completed":
                if has_provider:
                    m.event_published(source, type_, n)
            elif status == "failed":
                dead += n
            elif status == "retry":
                retried += n
        m.events_retried(retried)
        m.events_dead(dead)
        stats = getattr(self.relay, "stats", None)
        if stats is not None:
            forwarded = int(stats.forwarded)
            m.events_forwarded(forwarded - self._forwarded)
            self._forwarded = forwarded

    def on_forward_error(self, error: BaseException, count: int) -> None:
        self.metrics.forward_error("event", count)

    def on_outage(self, error: BaseException | None) -> None:
        self.metrics.set_provider_up(error is None)
        if error is not None:
            self.metrics.forward_error("unavailable")

    def on_ready(self, ready: bool) -> None:
        if self.state is not None:
            stats = getattr(self.relay, "stats", None)
            detail = "" if ready else str(getattr(stats, "last_error", "") or "not ready")
            self.state.set("relay", ready, detail[:200])


_shared: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def get_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """The one :class:`Metrics` of ``registry`` (default ``REGISTRY``), created on first use."""
    reg = REGISTRY if registry is None else registry
    with _shared_lock:
        found = _shared.get(reg)
        if found is None:
            found = _shared[reg] = Metrics(reg)
        return found


def is_async_engine(engine: object) -> TypeGuard[AsyncEngine]:
    """True for an ``AsyncEngine`` (without importing SQLAlchemy's asyncio extension, which
    needs greenlet, when none can exist)."""
    try:
        from sqlalchemy.ext.asyncio import AsyncEngine
    except ImportError:
        return False
    return isinstance(engine, AsyncEngine)


class BacklogSampler:
    """Refreshes the backlog/lag gauges from :func:`outbox.ops.backlog` every ``interval`` s.

    Run :meth:`run` as a task next to the relay loop (several relays on one database each sample
    the same table: aggregate with ``max``, not ``sum``). Works with a sync ``Engine`` (the query
    runs in a worker thread) or an ``AsyncEngine``. ``last``/``last_ok`` are what readiness and
    the CLI can show; ``on_result`` is told ``(ok, error)`` after every attempt.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        metrics: Metrics,
        *,
        interval: float = 5.0,
        on_result: Callable[[bool, BaseException | None], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.engine = engine
        self.metrics = metrics
        self.interval = interval
        self.on_result = on_result
        self.last: Backlog | None = None
        self.last_ok: float | None = None  # time.monotonic() of the last successful sample

    async def _query(self) -> Backlog:
        engine = self.engine
        if is_async_engine(engine):
            async with engine.connect() as conn:
                return await conn.run_sync(backlog)

        sync_engine = cast("Engine", engine)

        def sync_query() -> Backlog:
            with sync_engine.connect() as conn:
                return backlog(conn)

        return await anyio.to_thread.run_sync(sync_query)

    async def sample(self) -> Backlog:
        """Query once and update the gauges; a failure is counted and re-raised."""
        try:
            value = await self._query()
        except Exception as exc:
            self.metrics.backlog_errors.inc()
            if self.on_result is not None:
                self.on_result(False, exc)
            raise
        self.last = value
        self.last_ok = time.monotonic()
        self.metrics.set_backlog(value)
        if self.on_result is not None:
            self.on_result(True, None)
        return value

    async def run(self) -> None:
        """Sample forever (until cancelled); errors are logged and retried next interval."""
        while True:
            try:
                await self.sample()
            except Exception as exc:  # the database may be down: keep trying, keep serving
                log.warning("backlog query failed: %s: %s", type(exc).__name__, exc)
            await anyio.sleep(self.interval)

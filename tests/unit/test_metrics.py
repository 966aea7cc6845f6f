"""Prometheus metrics: names, labels, cardinality bound, backlog gauges (no servers)."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import outbox
from outbox.events import utcnow
from outbox.metrics import DURATION_BUCKETS, OTHER, Metrics, get_metrics
from outbox.ops import Backlog


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_seed_metric_names_and_values(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    ev = outbox.new_event("database", "public.users.create")
    m.observe_published(ev)
    m.event_published("database", "public.users.create", 2)
    m.observe_processed(ev, "completed", 0.004)
    m.event_processed("database", "public.users.create", "failed", 2.0)
    m.event_processed("database", "public.users.create", "completed")  # no duration known
    m.set_queue(7, 3)
    labels = {"source": "database", "type": "public.users.create"}
    assert value(registry, "eventbroker_events_published_total", **labels) == 3
    assert value(registry, "eventbroker_events_processed_total", **labels,
                 status="completed") == 2
    assert value(registry, "eventbroker_events_processed_total", **labels, status="failed") == 1
    assert value(registry, "eventbroker_event_processing_duration_seconds_count", **labels) == 2
    assert value(registry, "eventbroker_event_processing_duration_seconds_sum", **labels) == \
        pytest.approx(2.004)
    assert value(registry, "eventbroker_event_processing_duration_seconds_bucket", **labels,
                 le="0.005") == 1
    assert value(registry, "eventbroker_queue_size") == 7
    assert value(registry, "eventbroker_workers_active") == 3


def test_duration_buckets_span_1ms_to_30s(registry: CollectorRegistry) -> None:
    assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 30.0
    m = Metrics(registry)
    m.event_processed("system", "a.b", "completed", 0.01)
    text = generate_latest(registry).decode()
    assert 'le="0.001"' in text and 'le="30.0"' in text and 'le="+Inf"' in text


def test_relay_metrics(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    m.events_claimed(100, 0.002)
    m.events_claimed(0, 0.001)  # empty claim still times the transaction
    m.events_forwarded(98)
    m.forward_error("event", 2)
    m.forward_error("unavailable")
    m.events_retried(2)
    m.events_dead(1)
    m.set_provider_up(False)
    assert value(registry, "eventbroker_relay_events_claimed_total") == 100
    assert value(registry, "eventbroker_relay_claim_duration_seconds_count") == 2
    assert value(registry, "eventbroker_relay_events_forwarded_total") == 98
    assert value(registry, "eventbroker_relay_forward_errors_total", reason="event") == 2
    assert value(registry, "eventbroker_relay_forward_errors_total", reason="unavailable") == 1
    assert value(registry, "eventbroker_relay_events_retried_total") == 2
    assert value(registry, "eventbroker_relay_events_failed_total") == 1
    assert value(registry, "eventbroker_relay_provider_up") == 0
    with pytest.raises(ValueError):
        m.forward_error("timeout")


def test_backlog_gauges(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    now = utcnow()
    m.set_backlog(Backlog(pending=5, processing=2, failed=3, blocked_keys=1,
                          oldest_created_at=now - dt.timedelta(seconds=90)), now)
    assert value(registry, "eventbroker_relay_backlog_events", status="pending") == 5
    assert value(registry, "eventbroker_relay_backlog_events", status="processing") == 2
    assert value(registry, "eventbroker_relay_backlog_events", status="failed") == 3
    assert value(registry, "eventbroker_relay_blocked_keys") == 1
    assert value(registry, "eventbroker_relay_oldest_pending_age_seconds") == pytest.approx(90)
    m.set_backlog(Backlog())
    assert value(registry, "eventbroker_relay_oldest_pending_age_seconds") == 0


def test_label_cardinality_is_bounded(registry: CollectorRegistry) -> None:
    m = Metrics(registry, max_types=3)
    for i in range(50):
        m.event_published("database", f"public.t{i}.create")
        m.event_processed("database", f"public.t{i}.create", "completed", 0.001)
    m.event_published("an-id-1234", "public.t0.create")
    m.event_processed("system", "public.t0.create", "weird-status")
    published = {sample.labels["type"] for metric in registry.collect()
                 if metric.name == "eventbroker_events_published" for sample in metric.samples}
    assert published == {"public.t0.create", "public.t1.create", "public.t2.create", OTHER}
    assert value(registry, "eventbroker_events_published_total", source="database",
                 type=OTHER) == 47
    assert value(registry, "eventbroker_events_published_total", source=OTHER,
                 type="public.t0.create") == 1
    assert value(registry, "eventbroker_events_processed_total", source="system",
                 type="public.t0.create", status=OTHER) == 1
    # the per-label-set cache does not grow with unbounded raw values either
    for i in range(1000):
        m.event_published("database", f"x{i}")
    assert len(m._published) <= 4 * m.max_types + 64


def test_one_metrics_per_registry(registry: CollectorRegistry) -> None:
    shared = get_metrics(registry)
    assert get_metrics(registry) is shared
    with pytest.raises(ValueError):  # duplicate registration
        Metrics(registry)


def test_default_registry_is_prometheus_global() -> None:
    from prometheus_client import REGISTRY

    from outbox import metrics

    before = set(REGISTRY._collector_to_names)
    had = metrics._shared.get(REGISTRY)
    try:
        assert get_metrics().registry is REGISTRY
    finally:  # the process-wide registry as it was: other tests may register there too
        for collector in set(REGISTRY._collector_to_names) - before:
            REGISTRY.unregister(collector)
        if had is None:
            metrics._shared.pop(REGISTRY, None)

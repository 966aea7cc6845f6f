"""Trace context: writer span → event metadata → handler span, with an in-memory exporter."""

from __future__ import annotations

import builtins
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import outbox
from outbox import _tracing as tracing

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from tests.tracing_support import memory_spans  # noqa: E402


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider (installed once per process) exporting to memory."""
    with memory_spans() as memory:
        yield memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def test_no_active_span_no_context(spans: InMemorySpanExporter) -> None:
    assert tracing.current_trace_context() == {}


def test_writer_span_links_to_handler_span(spans: InMemorySpanExporter) -> None:
    tracer = otel_trace.get_tracer("app")
    with tracer.start_as_current_span("POST /users") as writer:
        ctx = tracing.current_trace_context()
        event = outbox.new_event("database", "public.users.create", {"id": 1}, metadata=ctx)
    writer_ctx = writer.get_span_context()
    assert ctx["traceparent"].startswith(
        f"00-{writer_ctx.trace_id:032x}-{writer_ctx.span_id:016x}-"
    )
    assert tracing.trace_context_of(event) == ctx

    # later, elsewhere (no span active): the relay/consumer continues the trace
    assert not otel_trace.get_current_span().get_span_context().is_valid
    with tracing.continue_trace(event) as span:
        assert span is not None
        inner = tracing.current_trace_context()
    handler = next(s for s in spans.get_finished_spans() if s.name.endswith(" process"))
    assert handler.name == "public.users.create process"
    assert handler.kind == otel_trace.SpanKind.CONSUMER
    assert handler.context.trace_id == writer_ctx.trace_id
    assert handler.parent is not None and handler.parent.span_id == writer_ctx.span_id
    assert handler.attributes["messaging.message.id"] == str(event.id)
    assert handler.attributes["messaging.destination.name"] == "public.users.create"
    assert inner["traceparent"].split("-")[1] == f"{writer_ctx.trace_id:032x}"


def test_tracestate_travels_too(spans: InMemorySpanExporter) -> None:
    parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
              "tracestate": "vendor=abc"}
    event = outbox.new_event("system", "a.b", metadata=parent)
    with tracing.continue_trace(event, "custom name", attributes={"extra": 1}):
        assert tracing.current_trace_context()["tracestate"] == "vendor=abc"
    span = spans.get_finished_spans()[-1]
    assert span.name == "custom name" and span.attributes["extra"] == 1
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"


def test_handler_error_is_recorded_and_raised(spans: InMemorySpanExporter) -> None:
    event = outbox.new_event("system", "a.b")
    with pytest.raises(RuntimeError), tracing.continue_trace(event):
        raise RuntimeError("handler failed")
    span = spans.get_finished_spans()[-1]
    assert not span.status.is_ok
    assert any(e.name == "exception" for e in span.events)


def test_event_without_context_gets_a_fresh_trace(spans: InMemorySpanExporter) -> None:
    with tracing.continue_trace(outbox.new_event("system", "a.b")) as span:
        assert span.get_span_context().is_valid
    assert spans.get_finished_spans()[-1].parent is None


def test_garbage_traceparent_is_ignored(spans: InMemorySpanExporter) -> None:
    event = outbox.new_event("system", "a.b", metadata={"traceparent": "nonsense",
                                                         "tracestate": 5})
    assert tracing.trace_context_of(event) == {"traceparent": "nonsense"}
    with tracing.continue_trace(event):
        pass
    assert spans.get_finished_spans()[-1].parent is None


def test_without_opentelemetry_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_otel(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    for name in [m for m in sys.modules if m.startswith("opentelemetry")]:
        monkeypatch.delitem(sys.modules, name)
    fresh = importlib.reload(tracing)
    try:
        assert not fresh.available()
        assert fresh.current_trace_context() == {}
        event = outbox.new_event("system", "a.b", metadata={"traceparent": "00-x"})
        with fresh.continue_trace(event) as span:
            assert span is None
    finally:
        monkeypatch.undo()
        importlib.reload(tracing)
    assert tracing.available()


def test_without_sdk_no_span_is_started(monkeypatch: pytest.MonkeyPatch,
                                        spans: InMemorySpanExporter) -> None:
    monkeypatch.setattr(otel_trace, "get_tracer_provider",
                        lambda: otel_trace.NoOpTracerProvider())
    tracing.refresh()
    with tracing.continue_trace(outbox.new_event("system", "a.b")) as span:
        assert span is None
    monkeypatch.undo()
    tracing.refresh()
    with tracing.continue_trace(outbox.new_event("system", "a.b")) as span:
        assert span is not None


def test_new_event_picks_up_the_active_span(spans: InMemorySpanExporter) -> None:
    assert "traceparent" not in outbox.new_event("system", "a.b").meta
    with otel_trace.get_tracer("app").start_as_current_span("job") as job:
        ev = outbox.new_event("system", "a.b", metadata={"k": 1})
    assert ev.meta["k"] == 1
    assert ev.meta["traceparent"].split("-")[2] == f"{job.get_span_context().span_id:016x}"

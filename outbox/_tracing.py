"""W3C trace context through the outbox, when OpenTelemetry is installed (extra ``otel``).

- The writer: :func:`current_trace_context` returns ``{"traceparent": …, "tracestate": …}`` for
  the span active at flush (empty when there is none); capture stores it in the event's metadata
  under those two keys, and the wire format carries them as the CloudEvents distributed-tracing
  extension.
- The relay and consumers: ``with continue_trace(event):`` around the handler call starts a
  ``CONSUMER`` span whose parent is the writer's span, so one trace links the request that made
  the change to every handler that reacted to it.

Without OpenTelemetry installed, or with only the API and no SDK configured, every function here
is a cheap no-op: nothing is added to events and no span is created.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.events import Event

__all__ = [
    "TRACE_KEYS",
    "available",
    "continue_trace",
    "current_span_context",
    "current_trace_context",
    "refresh",
    "set_error",
    "trace_context_of",
]

#: Metadata keys (and CloudEvents extension attributes) that carry the trace context.
TRACE_KEYS: tuple[str, ...] = ("traceparent", "tracestate")

_TRACER_NAME = "outbox"


@lru_cache(maxsize=1)
def _otel() -> Any:
    """The OpenTelemetry modules we use, or ``None`` when the API is not installed."""
    try:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None

    return SimpleNamespace(
        trace=trace,
        context=context,
        propagator=TraceContextTextMapPropagator(),
        # Installed when no SDK is configured: spans would not be recorded.
        noop_providers=(trace.ProxyTracerProvider, trace.NoOpTracerProvider),
    )


def available() -> bool:
    """True when the OpenTelemetry API is importable."""
    return _otel() is not None


_sdk_seen = False
_next_look = 0.0


def _recording(otel: Any) -> bool:
    """True once an SDK tracer provider is installed (spans would be recorded).

    ``get_tracer_provider()`` costs about 2 µs, too much per event: an installed SDK provider
    cannot be replaced (OpenTelemetry sets it once), so a positive answer is kept for good, and
    while there is none we look again at most once a second.
    """
    global _sdk_seen, _next_look
    if _sdk_seen:
        return True
    now = time.monotonic()
    if now < _next_look:
        return False
    _next_look = now + 1.0
    provider = otel.trace.get_tracer_provider()
    _sdk_seen = not isinstance(provider, otel.noop_providers)
    return _sdk_seen


def refresh() -> None:
    """Look for an SDK tracer provider again at the next call (else: at most once a second)."""
    global _sdk_seen, _next_look
    _sdk_seen, _next_look = False, 0.0


def current_span_context() -> Any:
    """The active span's ``SpanContext``, or ``None`` (no OpenTelemetry API, or no valid span)."""
    otel = _otel()
    if otel is None:
        return None
    span_context = otel.trace.get_current_span().get_span_context()
    return span_context if span_context.is_valid else None


def current_trace_context() -> dict[str, str]:
    """``traceparent`` (and ``tracestate`` when non-empty) of the active span, or ``{}``.

    Always W3C Trace Context, whatever global propagator the application configured, because
    the keys are part of the outbox's event format.
    """
    if current_span_context() is None:
        return {}
    otel = _otel()
    carrier: dict[str, str] = {}
    otel.propagator.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_KEYS and v}


def trace_context_of(source: Event | Mapping[str, Any] | None) -> dict[str, str]:
    """The trace keys found in an event's metadata (or in a metadata mapping)."""
    if source is None:
        return {}
    meta = source if isinstance(source, Mapping) else (getattr(source, "meta", None) or {})
    return {k: v for k in TRACE_KEYS if isinstance(v := meta.get(k), str) and v}


_OFF: AbstractContextManager[None] = nullcontext()


def continue_trace(
    event: Event,
    name: str | None = None,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Any]:
    """Run the block in a ``CONSUMER`` span that continues the event's trace.

    The span's parent is the writer's span from the event's ``traceparent`` (or the current span
    when the event carries none). It is named ``"{type} process"`` unless ``name`` is given,
    carries messaging attributes (event id, type, seq, source), and records an exception raised in
    the block. Yields the span, or ``None`` when tracing is off (no OpenTelemetry, or no SDK) —
    then it costs well under a microsecond, so the relay wraps every event.
    """
    otel = _otel()
    if otel is None or not _recording(otel):
        return _OFF
    return _span(otel, event, name, attributes)


def set_error(span: Any, description: str) -> None:
    """Mark ``span`` (from :func:`continue_trace`; ``None`` is fine) as failed.

    For handler failures that are reported in a result rather than raised.
    """
    otel = _otel()
    if span is None or otel is None:
        return
    span.set_status(otel.trace.Status(otel.trace.StatusCode.ERROR, description[:500]))


@contextmanager
def _span(
    otel: Any, event: Event, name: str | None, attributes: Mapping[str, Any] | None
) -> Iterator[Any]:
    carrier = trace_context_of(event)
    parent = otel.propagator.extract(carrier) if carrier else None
    attrs: dict[str, Any] = {
        "messaging.system": "outbox",
        "messaging.operation.type": "process",
        "messaging.destination.name": event.type,
        "messaging.message.id": str(event.id),
        "outbox.event.source": event.source,
    }
    seq = event.__dict__.get("seq")
    if seq is not None:
        attrs["outbox.event.seq"] = seq
    if attributes:
        attrs.update(attributes)
    tracer = otel.trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        name or f"{event.type} process",
        context=parent,
        kind=otel.trace.SpanKind.CONSUMER,
        attributes=attrs,
    ) as span:
        yield span

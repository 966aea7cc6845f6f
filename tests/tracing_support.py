"""An OpenTelemetry SDK tracer provider exporting to memory, for the tracing tests.

OpenTelemetry lets a process set its global tracer provider only once; a test that installed one
would leave every later test of the process tracing. :func:`memory_spans` therefore installs the
provider for the block only and puts back what was there before (as OpenTelemetry's own test
utilities reset their globals), so tests see the same process-wide state in any order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from outbox import _tracing as tracing


def _set_global_tracer_provider(provider: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    once = Once()
    if provider is not None:
        once.do_once(lambda: None)  # "set": what trace.set_tracer_provider leaves behind
    trace._TRACER_PROVIDER_SET_ONCE = once
    trace._TRACER_PROVIDER = provider
    tracing.refresh()  # outbox notices the change now, not within the second


@contextmanager
def memory_spans() -> Iterator[Any]:
    """An ``InMemorySpanExporter`` receiving every span ended inside the block."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    previous = trace._TRACER_PROVIDER
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _set_global_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _set_global_tracer_provider(previous)
        provider.shutdown()

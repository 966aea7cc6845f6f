"""An OpenTelemetry SDK tracer provider exporting to memory, shared by the tracing tests.

OpenTelemetry lets a process set its global tracer provider once; the first test that needs one
installs it and later ones add their own in-memory exporter to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from outbox import tracing


@contextmanager
def memory_spans() -> Iterator[Any]:
    """An ``InMemorySpanExporter`` receiving every span ended inside the block."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    tracing.refresh()  # outbox notices the new provider now, not within the second
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()  # the processor stays registered but exports nothing any more

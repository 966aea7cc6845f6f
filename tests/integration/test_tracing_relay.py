"""The writer's span continues in the relay's handler span; handler logs carry the event."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox._logs import configure_logging
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay
from tests.tracing_support import memory_spans

pytest.importorskip("opentelemetry.sdk")


@pytest.fixture
def spans() -> Iterator[Any]:
    with memory_spans() as exporter:
        yield exporter


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    out = io.StringIO()
    configure_logging("INFO", "json", out)
    yield out
    root.handlers[:] = before[0]
    root.setLevel(before[1])


@pytest.mark.anyio
async def test_writer_span_links_to_relay_handler_span(
    pg_engine: sa.Engine, spans: Any, log_lines: io.StringIO
) -> None:
    from opentelemetry import trace

    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("POST /orders") as writer, Session(pg_engine) as session:
        event = outbox.new_event("system", "app.order.placed", {"order": 7})
        session.add(event)
        session.commit()
        event_id, seq = event.id, event.seq
    writer_ctx = writer.get_span_context()
    assert event.meta["traceparent"].split("-")[2] == f"{writer_ctx.span_id:016x}"

    broker = outbox.Broker(MemoryProvider())
    seen: list[Any] = []

    @broker.subscribe("app.>")
    def handler(ev: outbox.Event) -> None:  # a sync handler: runs in a worker thread
        seen.append(trace.get_current_span().get_span_context())
        logging.getLogger("app.handlers").info("order placed")

    relay = Relay(pg_engine, broker=broker, provider=broker.provider)
    with anyio.fail_after(30):
        await relay.run(once=True)

    (handler_ctx,) = seen
    assert handler_ctx.trace_id == writer_ctx.trace_id
    span = next(s for s in spans.get_finished_spans() if s.name == "app.order.placed process")
    assert span.kind == trace.SpanKind.CONSUMER
    assert span.parent is not None and span.parent.span_id == writer_ctx.span_id
    assert span.context.span_id == handler_ctx.span_id
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (mine,) = [r for r in records if r["logger"] == "app.handlers"]
    assert (mine["event_id"], mine["event_type"], mine["event_seq"]) == (
        str(event_id), "app.order.placed", seq)
    assert mine["trace_id"] == f"{writer_ctx.trace_id:032x}"


@pytest.mark.anyio
async def test_failing_handler_marks_the_span(pg_engine: sa.Engine, spans: Any) -> None:
    with Session(pg_engine) as session:
        session.add(outbox.new_event("system", "app.order.placed"))
        session.commit()
    broker = outbox.Broker(MemoryProvider(), retry_policy=outbox.RetryPolicy(max_retries=0))

    @broker.subscribe("app.>")
    async def boom(ev: outbox.Event) -> None:
        raise RuntimeError("no")

    relay = Relay(pg_engine, broker=broker, provider=broker.provider,
                  retry_policy=broker.retry_policy)
    with anyio.fail_after(30):
        await relay.run(once=True)
    span = next(s for s in spans.get_finished_spans() if s.name == "app.order.placed process")
    assert not span.status.is_ok and "boom" in (span.status.description or "")
    assert span.parent is None  # written outside any span: a trace of its own


@pytest.mark.anyio
async def test_captured_change_carries_the_request_span_to_the_handler(
    db_url: str, spans: Any
) -> None:
    """capture at flush → events.metadata.traceparent → relay → handler span of the same trace."""
    from opentelemetry import trace

    from tests.integration.capture_models import User, make_db

    with contextlib.contextmanager(make_db)(db_url, models=[User]) as db:
        tracer = trace.get_tracer("app")
        with tracer.start_as_current_span("PUT /users/1") as request, db.Session() as session:
            session.add(User(id=1, name="Ann"))
            session.commit()
        (written,) = db.events()
        request_ctx = request.get_span_context()
        assert written.meta["traceparent"].split("-")[1:3] == [
            f"{request_ctx.trace_id:032x}", f"{request_ctx.span_id:016x}"]
        # outside any span nothing is added
        with db.Session() as session:
            session.get(User, 1).name = "Anne"  # type: ignore[union-attr]
            session.commit()
        assert "traceparent" not in db.events()[1].meta

        broker = outbox.Broker(MemoryProvider())
        seen: list[Any] = []

        @broker.subscribe("*.cap_users.*")
        async def handler(ev: outbox.Event) -> None:
            seen.append((ev.operation, trace.get_current_span().get_span_context()))

        relay = Relay(db.engine, broker=broker, provider=broker.provider, notify=False)
        with anyio.fail_after(30):
            await relay.run(once=True)
        created = dict(seen)["create"]
        assert created.trace_id == request_ctx.trace_id
        handler_span = next(s for s in spans.get_finished_spans()
                            if s.context.span_id == created.span_id)
        assert handler_span.parent is not None
        assert handler_span.parent.span_id == request_ctx.span_id
        assert dict(seen)["update"].trace_id != request_ctx.trace_id

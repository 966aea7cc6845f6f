"""Seeding helpers for the operations tests (CLI, ops, metrics, audit docs)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox.events import Event, utcnow

#: Strings that would break a query built by string concatenation.
INJECTIONS = (
    "'; DROP TABLE events; --",
    "x' OR '1'='1",
    "\" OR 1=1 --",
    "%",
    "_",
    "\\",
    "users'); DELETE FROM events; --",
)


def add(engine: sa.Engine, events: Iterable[Event]) -> list[Event]:
    """Insert ``events`` in one transaction; return them (seq loaded)."""
    found = list(events)
    with Session(engine, expire_on_commit=False) as session:
        session.add_all(found)
        session.commit()
        for ev in found:
            _ = ev.seq
    return found


def event(
    type: str = "public.users.create",
    *,
    status: str = "pending",
    age: dt.timedelta = dt.timedelta(0),
    **kw: Any,
) -> Event:
    """A new event of ``type`` created ``age`` ago with ``status`` (finished ones get dates)."""
    created = utcnow() - age
    ev = outbox.new_event(kw.pop("source", "database"), type, kw.pop("payload", {}),
                          created_at=created, status=status, **kw)
    if status in ("completed", "failed"):
        ev.processed_at = created
        ev.completed_at = created
    if status == "failed":
        ev.error = kw.get("error") or "boom"
        ev.retry_count = 3
    return ev


def statuses(engine: sa.Engine) -> dict[uuid.UUID, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Event.id, Event.status)).all()
    return dict(rows)


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Event)).scalar_one())

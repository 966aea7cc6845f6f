"""The inbox (``outbox_inbox``): which events a consumer group has handled (``outbox.inbox``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from outbox._sql.common import insert_missing
from outbox.events import utcnow
from outbox.schema import inbox_table

__all__ = ["delete_rows", "handled_statement", "old_rows", "record_statement"]

c = inbox_table.c


def record_statement(dialect: sa.Dialect, group: str, event_id: uuid.UUID
                     ) -> tuple[sa.Insert, bool]:
    """Record ``event_id`` as handled by ``group`` unless it is already: the insert, and whether
    it says "inserted" with a returned row (else by rowcount: some drivers report -1 for
    ``INSERT … ON CONFLICT``)."""
    values = {"group_name": group, "event_id": event_id, "handled_at": utcnow()}
    statement = insert_missing(inbox_table, values, dialect.name)
    if dialect.insert_returning:
        return statement.returning(c.event_id), True
    return statement, False


def handled_statement(group: str, event_id: uuid.UUID) -> sa.Select[Any]:
    """A row when ``group`` has recorded ``event_id``."""
    return sa.select(sa.literal(1)).where(c.group_name == group, c.event_id == event_id)


def old_rows(cutoff: dt.datetime, limit: int) -> sa.Select[Any]:
    """Keys of up to ``limit`` rows handled before ``cutoff``."""
    return sa.select(c.group_name, c.event_id).where(c.handled_at < cutoff).limit(limit)


def delete_rows(keys: Sequence[tuple[Any, ...]]) -> sa.Delete:
    """Delete the rows of these ``(group_name, event_id)`` keys."""
    return sa.delete(inbox_table).where(sa.tuple_(c.group_name, c.event_id).in_(keys))

"""Statement helpers the modules of :mod:`outbox._sql` share."""

from __future__ import annotations

import sqlalchemy as sa

from outbox.exceptions import OutboxError

__all__ = ["insert_missing"]


def insert_missing(table: sa.Table, values: dict[str, object], dialect: str) -> sa.Insert:
    """``INSERT`` of one row of ``table`` that does nothing when its key exists (the rowcount, or
    the rows ``RETURNING`` gives, say whether it was inserted): ``ON CONFLICT DO NOTHING`` on
    PostgreSQL and SQLite, ``INSERT IGNORE`` on MariaDB/MySQL."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(values).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).values(values).on_conflict_do_nothing()
    if dialect in ("mysql", "mariadb"):
        return sa.insert(table).values(values).prefix_with("IGNORE")
    raise OutboxError(f"the outbox does not support the {dialect!r} dialect")

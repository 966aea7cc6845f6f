"""outbox: the history's indexes on writer-filled text cannot overflow.

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-12-08

PostgreSQL only. ``user_id``, ``session_id``, ``entity``, ``entity_id`` and ``instance_id`` are
filled by whoever writes an event; a value longer than a btree entry holds (~2.7 kB after
compression) made the relay's move of its row into ``events_done`` fail. On ``events_done``,
``user_id``, ``session_id`` and ``entity_id`` get hash indexes (equality only, any length; plain
``column = value`` SQL still uses them), ``instance_id`` a btree over ``left(instance_id, 200)``
with ``created_at``. The indexes keep their names. The upgrade rebuilds four indexes of the
history, holding a lock that blocks the relay's completions meanwhile.

Frozen: this revision does not read the current mapping; later changes get new revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "outbox_0003"
down_revision: str | Sequence[str] | None = "outbox_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAMES = ("ix_events_entity_entity_id", "ix_events_user_id", "ix_events_session_id",
         "ix_events_instance_id_created_at")
BOUNDED = (
    "CREATE INDEX ix_events_entity_entity_id ON events_done USING hash (entity_id) "
    "WHERE entity_id IS NOT NULL",
    "CREATE INDEX ix_events_user_id ON events_done USING hash (user_id) "
    "WHERE user_id IS NOT NULL",
    "CREATE INDEX ix_events_session_id ON events_done USING hash (session_id) "
    "WHERE session_id IS NOT NULL",
    "CREATE INDEX ix_events_instance_id_created_at ON events_done "
    "(left(instance_id, 200), created_at)",
)
WHOLE = (
    "CREATE INDEX ix_events_entity_entity_id ON events_done (entity, entity_id) "
    "WHERE entity IS NOT NULL OR entity_id IS NOT NULL",
    "CREATE INDEX ix_events_user_id ON events_done (user_id) WHERE user_id IS NOT NULL",
    "CREATE INDEX ix_events_session_id ON events_done (session_id) WHERE session_id IS NOT NULL",
    "CREATE INDEX ix_events_instance_id_created_at ON events_done (instance_id, created_at)",
)


def _replace(statements: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in NAMES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    for sql in statements:
        op.execute(sql)


def upgrade() -> None:
    _replace(BOUNDED)


def downgrade() -> None:
    _replace(WHOLE)

"""outbox's revisions outbox_0003 and outbox_0004 (bounded history indexes; the database bus
reads batches between snapshots)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

A later outbox release shipped a new revision: one more revision of this application's own
chain applies it (docs/alembic.md, "A later outbox release with a new revision").
"""

from __future__ import annotations

import outbox.migrations

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox.migrations.upgrade("outbox_0004")


def downgrade() -> None:
    outbox.migrations.downgrade("outbox_0002")

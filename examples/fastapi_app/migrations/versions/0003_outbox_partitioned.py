"""outbox's revision outbox_0002 (events partitioned by status on PostgreSQL)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

A later outbox release shipped a new revision: one more revision of this application's own
chain applies it, exactly like 0002 applied the first one.
"""

from __future__ import annotations

import outbox.migrations

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox.migrations.upgrade("outbox_0002")


def downgrade() -> None:
    outbox.migrations.downgrade("outbox_0001")

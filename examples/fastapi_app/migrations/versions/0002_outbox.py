"""outbox tables (outbox's revision outbox_0001), in this application's own chain

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

The outbox ships its revisions in the package; this revision applies them on this connection,
in this transaction. A later outbox release with a new revision gets one more revision like
this one: ``outbox.migrations.upgrade("<new>")`` / ``downgrade("outbox_0001")``.
"""

from __future__ import annotations

import outbox.migrations

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox.migrations.upgrade("outbox_0001")


def downgrade() -> None:
    outbox.migrations.downgrade("base")

"""outbox tables (outbox's revision outbox_0002), in this application's own chain

Revision ID: 0001
Revises:
Create Date: 2026-12-07

The outbox ships its revisions in the package; this revision applies them on this connection,
in this transaction. A later outbox release with a new revision gets one more revision like
this one: ``outbox.migrations.upgrade("<new>")`` / ``downgrade("outbox_0002")``.
"""

from __future__ import annotations

import outbox.migrations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox.migrations.upgrade("outbox_0002")


def downgrade() -> None:
    outbox.migrations.downgrade("base")

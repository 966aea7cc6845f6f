"""outbox: the database bus reads batches between snapshots instead of below a watermark.

Revision ID: outbox_0004
Revises: outbox_0003
Create Date: 2026-12-07

A consumer group's position becomes the ``pg_current_snapshot()`` it last read up to (plus the
open batch it is claiming from: ``batch``, ``claimed``, ``batch_end``); a claim lists its events'
ids (``event_ids``; ``ix_outbox_consumer_claims_expiry`` finds expired claims). PostgreSQL gets
``ix_events_bus_seq`` on ``events_done`` (a batch is read in ``seq`` order).
docs/database-provider.md explains the design.

Positions are converted without skipping or delivering anything again: everything a group had
claimed, and everything its start excluded, is visible in the snapshot it gets; the rest of a
transaction whose rows a batch split, the rows a group started at a time still had to deliver,
and every claim in flight become claims listing their events, expired so that the next consumer
takes them at once. Stop the consumers for the upgrade (the relay may keep running).

Downgrade: each group goes back to a watermark position at or before everything it has not
settled; events claimed and not yet settled may be delivered again (at-least-once), none is
skipped.

Frozen: this revision does not read the current mapping; later changes get new revisions.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "outbox_0004"
down_revision: str | Sequence[str] | None = "outbox_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAX_SEQ = 2**63 - 1
BUS_SEQ_INDEX = "CREATE INDEX ix_events_bus_seq ON events_done (seq) WHERE txid IS NOT NULL"
EXPIRED = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _partitioned(bind: sa.Connection) -> bool:
    return (
        bind.dialect.name == "postgresql"
        and bind.exec_driver_sql(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass('events')"
        ).scalar()
        == "p"
    )


def _snapshot(text: str) -> tuple[int, int, list[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",")] if xip else []


def _kept(row: Any, start: str | None, since: dt.datetime | None) -> bool:
    """The old start rule: a group started at ``start`` skips rows of transactions already
    ended then, unless created at or after ``since``."""
    if start is None:
        return True
    _xmin, xmax, xip = _snapshot(start)
    txid = int(row.txid)
    if txid >= xmax or txid in xip:
        return True
    return since is not None and row.created_at >= since


def _lower_snapshot(frontier_txid: int, start: str | None) -> str:
    """A snapshot in which exactly the transactions up to ``frontier_txid``, and those the old
    start snapshot saw ended, are visible."""
    floor = frontier_txid + 1
    if start is None:
        return f"{floor}:{floor}:"
    _xmin, xmax, xip = _snapshot(start)
    top = max(xmax, floor)
    open_ = sorted(x for x in xip if x >= floor)
    return f"{open_[0] if open_ else top}:{top}:{','.join(map(str, open_))}"


def _insert_claim(bind: sa.Connection, group: str, rows: list[Any], now: dt.datetime) -> None:
    rows = sorted(rows, key=lambda r: r.seq)
    last = rows[-1]
    bind.execute(
        sa.text(
            "INSERT INTO outbox_consumer_claims (group_name, hi_txid, hi_seq, lo_txid, lo_seq, "
            "event_ids, consumer, token, attempt, lease_expires_at, claimed_at) VALUES (:g, :ht, "
            ":hs, :lt, :ls, :ids, 'outbox_0004', :tok, 0, :exp, :now)"
        ),
        {
            "g": group,
            "ht": int(last.txid or 0),
            "hs": int(last.seq),
            "lt": int(rows[0].txid or 0),
            "ls": int(rows[0].seq) - 1,
            "ids": ",".join(str(r.id) for r in rows),
            "tok": uuid.uuid4(),
            "exp": EXPIRED,
            "now": now,
        },
    )


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    if _partitioned(bind):
        op.execute(BUS_SEQ_INDEX)
    op.add_column("outbox_consumers", sa.Column("snapshot", sa.Text(), nullable=True))
    op.add_column("outbox_consumers", sa.Column("batch", sa.Text(), nullable=True))
    op.add_column("outbox_consumers", sa.Column("batch_end", sa.BigInteger(), nullable=True))
    op.add_column(
        "outbox_consumer_claims",
        sa.Column("event_ids", sa.Text(), nullable=False, server_default=""),
    )
    op.create_index("ix_outbox_consumer_claims_expiry", "outbox_consumer_claims",
                    ["group_name", "lease_expires_at"])
    now = dt.datetime.now(dt.UTC)
    groups = bind.execute(
        sa.text(
            "SELECT group_name, claimed_txid, claimed, start_snapshot, start_time "
            "FROM outbox_consumers"
        )
    ).all()
    row_cols = "id, seq, txid, created_at"
    for g in groups:
        name, ft, fs = g.group_name, int(g.claimed_txid), int(g.claimed)
        start = g.start_snapshot if pg else None
        if start is not None and ft >= _snapshot(start)[1]:
            start = None  # the group is past every row its start rule concerned
        since = g.start_time if start is not None else None
        # every claim in flight: the rows of its range (what the old reader would read again)
        for k in bind.execute(
            sa.text(
                "SELECT hi_txid, hi_seq, lo_txid, lo_seq FROM outbox_consumer_claims "
                "WHERE group_name = :g"
            ),
            {"g": name},
        ).all():
            where = (
                "txid IS NOT NULL AND (txid, seq) > (:lt, :ls) AND (txid, seq) <= (:ht, :hs)"
                if pg
                else "seq > :ls AND seq <= :hs"
            )
            rows = [
                r
                for r in bind.execute(
                    sa.text(f"SELECT {row_cols} FROM events WHERE {where}"),  # noqa: S608 (fixed text)
                    {"lt": k.lo_txid, "ls": k.lo_seq, "ht": k.hi_txid, "hs": k.hi_seq},
                ).all()
                if _kept(r, start, since)
            ]
            bind.execute(
                sa.text(
                    "DELETE FROM outbox_consumer_claims WHERE group_name = :g AND hi_txid = :ht "
                    "AND hi_seq = :hs"
                ),
                {"g": name, "ht": k.hi_txid, "hs": k.hi_seq},
            )
            if rows:
                _insert_claim(bind, name, rows, now)
        if not pg:
            continue  # SQLite: `claimed` (a seq) keeps its meaning
        # the rest of a transaction a full batch split, and rows a time start still owed
        rest = []
        if ft > 0 and fs < MAX_SEQ:
            rest = [
                r
                for r in bind.execute(
                    sa.text(f"SELECT {row_cols} FROM events WHERE txid = :t AND seq > :s"),  # noqa: S608
                    {"t": ft, "s": fs},
                ).all()
                if _kept(r, start, since)
            ]
        if start is not None and since is not None:
            xmax = _snapshot(start)[1]
            rest += [
                r
                for r in bind.execute(
                    sa.text(
                        f"SELECT {row_cols} FROM events WHERE txid > :t AND txid < :x "  # noqa: S608
                        "AND created_at >= :since AND pg_visible_in_snapshot(txid::text::xid8, "
                        ":snap::pg_snapshot)"
                    ),
                    {"t": ft, "x": xmax, "since": since, "snap": start},
                ).all()
            ]
        if rest:
            _insert_claim(bind, name, rest, now)
        if ft == 0:  # at the beginning, or rebased (every row txid 0): seq alone orders
            snap, top = bind.execute(
                sa.text(
                    "SELECT pg_current_snapshot()::text, (SELECT max(seq) FROM events "
                    "WHERE txid IS NOT NULL)"
                )
            ).one()
            cursor = (
                {"snap": None, "batch": snap, "seq": fs, "end": top}
                if top is not None and top > fs
                else {"snap": snap, "batch": None, "seq": 0, "end": None}
            )
        else:
            cursor = {"snap": _lower_snapshot(ft, start), "batch": None, "seq": 0, "end": None}
        bind.execute(
            sa.text(
                "UPDATE outbox_consumers SET snapshot = :snap, batch = :batch, claimed = :seq, "
                "batch_end = :end, start_time = NULL WHERE group_name = :g"
            ),
            {**cursor, "g": name},
        )
    for column in ("position", "position_txid", "claimed_txid", "start_snapshot"):
        op.drop_column("outbox_consumers", column)


def downgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    op.add_column(
        "outbox_consumers",
        sa.Column("position", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "outbox_consumers",
        sa.Column("position_txid", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "outbox_consumers",
        sa.Column("claimed_txid", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column("outbox_consumers", sa.Column("start_snapshot", sa.Text(), nullable=True))
    groups = bind.execute(
        sa.text("SELECT group_name, snapshot, batch, claimed FROM outbox_consumers")
    ).all()
    for g in groups:
        if not pg:
            ft, fs, start = 0, int(g.claimed), None
            low = bind.execute(
                sa.text("SELECT min(lo_seq) FROM outbox_consumer_claims WHERE group_name = :g"),
                {"g": g.group_name},
            ).scalar()
            if low is not None:
                fs = min(fs, int(low))
        else:
            # rows not visible in the snapshot are after (xmin - 1, max) or skipped by nothing;
            # claims in flight: back to before their lowest transaction, and no start rule
            ft, fs, start = (
                (_snapshot(g.snapshot)[0] - 1, MAX_SEQ, g.snapshot)
                if g.snapshot
                else (0, int(g.claimed) if g.batch is not None else 0, None)
            )
            ids = [
                i
                for (text,) in bind.execute(
                    sa.text("SELECT event_ids FROM outbox_consumer_claims WHERE group_name = :g"),
                    {"g": g.group_name},
                ).all()
                for i in text.split(",")
                if i
            ]
            if ids:
                low = bind.execute(
                    sa.text("SELECT min(txid) FROM events WHERE id = ANY(:ids)"),
                    {"ids": [uuid.UUID(i) for i in ids]},
                ).scalar()
                if low is not None and (int(low) - 1, MAX_SEQ) < (ft, fs):
                    ft, fs = int(low) - 1, MAX_SEQ
                start = None
        bind.execute(
            sa.text(
                "UPDATE outbox_consumers SET position = :fs, position_txid = :ft, claimed = :fs, "
                "claimed_txid = :ft, start_snapshot = :start, start_time = NULL "
                "WHERE group_name = :g"
            ),
            {"fs": fs, "ft": ft, "start": start, "g": g.group_name},
        )
    # Claims in flight are given up: the positions above are at or before their events.
    bind.execute(sa.text("DELETE FROM outbox_consumer_claims"))
    op.drop_index("ix_outbox_consumer_claims_expiry", table_name="outbox_consumer_claims")
    op.drop_column("outbox_consumer_claims", "event_ids")
    for column in ("batch_end", "batch", "snapshot"):
        op.drop_column("outbox_consumers", column)
    if _partitioned(bind):
        op.execute("DROP INDEX ix_events_bus_seq")

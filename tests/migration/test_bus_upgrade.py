"""Revision outbox_0004 converts consumer groups mid-stream: nothing skipped, nothing twice.

The database is brought to outbox_0002 and given the positions the watermark reader of that
revision wrote (by hand, with its rules): a group at the beginning whose last claim stopped in
the middle of a transaction and is still held by a member that died, and a group started "now"
while a transaction that wrote an event was still running. After ``upgrade head`` the new reader
delivers to each group exactly the events it had not had, each once; then downgrade and upgrade
again keep every group at or before what it has not settled.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import anyio
import pytest
import sqlalchemy as sa
from alembic import command

import outbox
from outbox._sql import events as event_sql
from outbox.events import Event
from outbox.providers.database import DatabaseProvider
from tests.migration.test_migrations import repo_config

MAX_SEQ = 2**63 - 1


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    command.upgrade(repo_config(pg_url), "outbox_0002")
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def ev(n: int) -> Event:
    return outbox.new_event("system", "app.thing.changed", {"n": n})


def _commit(engine: sa.Engine, *events: Event) -> int:
    with engine.begin() as conn:
        event_sql.insert_events(conn, list(events), True)
        return int(conn.execute(sa.select(event_sql.CURRENT_XID)).scalar_one())


def _seq(engine: sa.Engine, e: Event) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.text("SELECT seq FROM events WHERE id = :i"), {"i": e.id}).scalar_one()
        )


async def _drain(url: str, group: str) -> list[uuid.UUID]:
    p = DatabaseProvider(url, poll_interval=0.05, lease=1.0)
    got: list[uuid.UUID] = []
    try:
        async with p.consume(group=group) as it:
            while True:
                with anyio.move_on_after(2.5) as scope:  # past the dead member's lease
                    d = await it.__anext__()
                if scope.cancelled_caught:
                    break
                got.append(d.event.id)
                await d.ack()
    finally:
        await p.close()
    return got


def test_groups_mid_stream_upgrade_without_skips_or_repeats(engine: sa.Engine, pg_url: str) -> None:
    now = dt.datetime.now(dt.UTC)
    e1, e2, e3, e4, e5, late = (ev(i) for i in range(6))
    t1 = _commit(engine, e1, e2, e3)
    t2 = _commit(engine, e4, e5)
    # "mid": from the beginning; its last claim took e1, e2 (a full batch of 2 ending inside
    # t1) and its member died holding it; e3 was never claimed
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_consumers (group_name, position, position_txid, claimed, "
                "claimed_txid, created_at, updated_at) VALUES ('mid', 0, 0, :s, :t, :now, :now)"
            ),
            {"s": _seq(engine, e2), "t": t1, "now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO outbox_consumer_claims (group_name, hi_txid, hi_seq, lo_txid, lo_seq, "
                "consumer, token, attempt, lease_expires_at, claimed_at) VALUES ('mid', :t, :s, 0, "
                "0, 'dead', :tok, 1, :exp, :now)"
            ),
            {
                "t": t1,
                "s": _seq(engine, e2),
                "tok": uuid.uuid4(),
                "exp": now + dt.timedelta(seconds=1),
                "now": now,
            },
        )
    # "now": created while `late`'s transaction ran (the old rule: the watermark, plus the
    # creation snapshot whose committed rows are skipped)
    holder = engine.connect()
    tx = holder.begin()
    event_sql.insert_events(holder, [late], True)
    with engine.begin() as conn:
        snap = conn.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar_one()
        wm = int(snap.split(":")[0])
        conn.execute(
            sa.text(
                "INSERT INTO outbox_consumers (group_name, position, position_txid, claimed, "
                "claimed_txid, start_snapshot, created_at, updated_at) VALUES ('now', :m, :t, :m, "
                ":t, :snap, :now, :now)"
            ),
            {"m": MAX_SEQ, "t": wm - 1, "snap": snap, "now": now},
        )
    tx.commit()
    holder.close()

    command.upgrade(repo_config(pg_url), "head")
    after = ev(9)
    _commit(engine, after)
    mid = anyio.run(_drain, pg_url, "mid")
    assert sorted(mid) == sorted([e1.id, e2.id, e3.id, e4.id, e5.id, late.id, after.id])
    assert len(mid) == len(set(mid))
    assert anyio.run(_drain, pg_url, "now") == [late.id, after.id]
    assert t2 > t1

    # downgrade and upgrade again: nothing settled comes back as skipped
    again = ev(10)
    command.downgrade(repo_config(pg_url), "outbox_0002")
    _commit(engine, again)
    command.upgrade(repo_config(pg_url), "head")
    assert again.id in anyio.run(_drain, pg_url, "now")

"""The database bus reads batches between snapshots: no skipped events, no stalls.

What a reader may read depends on every transaction of the PostgreSQL *cluster*, so these tests
run on a cluster of their own (``PrivatePostgres``, started from the local server binaries on
another loopback port): transactions of other tests on the shared server cannot change them.

- a write transaction held open in another database, or in the same database without events,
  holds back nothing; one that wrote events holds back only its own events, which arrive after
  its commit (not skipped);
- a property-based interleaving (hypothesis) of several writers (begin, insert, savepoint,
  rollback to savepoint, commit, rollback, transactions held across many reads, transactions
  with an id and no event) against claims of two consumer groups at random moments: each group
  receives exactly the committed events, each once, every transaction's events in ``seq``
  order and every key's events in the order they were written (writes of a key serialised, as
  row locks serialise them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import outbox
from outbox._sql import bus as dbsql
from outbox._sql import events as event_sql
from outbox.events import Event
from outbox.providers.base import StartPosition
from outbox.providers.database import DatabaseProvider
from outbox.schema import consumer_claims_table, consumers_table
from tests.servers import PrivatePostgres

pytestmark = pytest.mark.anyio


@dataclass
class Cluster:
    server: PrivatePostgres
    bus: sa.Engine  # the database with the outbox tables
    other: sa.Engine  # another database of the same cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server = PrivatePostgres()
    server.start()
    try:
        admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE bus")
            conn.exec_driver_sql("CREATE DATABASE other")
        admin.dispose()
        base = server.url.rsplit("/", 1)[0]
        bus = sa.create_engine(f"{base}/bus")
        other = sa.create_engine(f"{base}/other")
        outbox.create_schema(bus)
        with other.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x int)")
        yield Cluster(server, bus, other)
        bus.dispose()
        other.dispose()
    finally:
        server.close()


def _reset(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "TRUNCATE events, outbox_consumers, outbox_consumer_claims, "
            "outbox_inbox, outbox_dead_letters"
        )


def ev(key: str = "k", n: int = 0) -> Event:
    return outbox.new_event("system", "app.thing.changed", {"n": n}, entity="thing", entity_id=key)


async def _take(it: Any, n: int, seconds: float) -> list[Any]:
    out = []
    with anyio.fail_after(seconds):
        for _ in range(n):
            out.append(await it.__anext__())
    return out


async def _nothing(it: Any, seconds: float = 0.3) -> bool:
    with anyio.move_on_after(seconds):
        await it.__anext__()
        return False
    return True


async def test_long_writes_elsewhere_hold_back_nothing(cluster: Cluster) -> None:
    _reset(cluster.bus)
    p = DatabaseProvider(cluster.bus, poll_interval=0.05)
    it = p.consume(group="g")
    # another database of the server: an uncommitted INSERT (a transaction id), held
    elsewhere = cluster.other.connect()
    elsewhere.begin()
    elsewhere.execute(sa.text("INSERT INTO t VALUES (1)"))
    # the same database: a transaction with an id that writes no event, held
    idle = cluster.bus.connect()
    idle.begin()
    idle.execute(sa.select(event_sql.CURRENT_XID))
    # and one that wrote an event, held: only that event waits
    writer = cluster.bus.connect()
    wtx = writer.begin()
    held = ev("held")
    event_sql.insert_events(writer, [held], True)
    try:
        latencies = []
        for i in range(20):
            e = ev("flow", i)
            start = time.monotonic()
            await p.publish(e)
            (d,) = await _take(it, 1, 5.0)
            latencies.append(time.monotonic() - start)
            assert d.event.id == e.id
            await d.ack()
        assert max(latencies) < 1.0, latencies  # never the length of a hold
        assert await _nothing(it)
        await anyio.to_thread.run_sync(wtx.commit)
        (d,) = await _take(it, 1, 5.0)  # the held event is not skipped
        assert d.event.id == held.id
        await d.ack()
        assert await _nothing(it)
    finally:
        for conn in (elsewhere, idle, writer):
            conn.close()
        await it.aclose()
        await p.close()


# -- the interleaving property -------------------------------------------------------------------

WRITERS = 3
KEYS = ("a", "b", "c")
GROUPS = {"one": 1, "two": 2}  # group -> members

Op = tuple[Any, ...]
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("insert"), st.integers(0, WRITERS - 1), st.sampled_from(KEYS), st.integers(1, 3)
        ),
        st.tuples(st.just("xid"), st.integers(0, WRITERS - 1)),
        st.tuples(st.just("savepoint"), st.integers(0, WRITERS - 1)),
        st.tuples(st.just("rollback_to"), st.integers(0, WRITERS - 1)),
        st.tuples(st.just("commit"), st.integers(0, WRITERS - 1)),
        st.tuples(st.just("rollback"), st.integers(0, WRITERS - 1)),
        st.tuples(
            st.just("claim"), st.sampled_from(sorted(GROUPS)), st.integers(0, 1), st.integers(1, 4)
        ),
    ),
    min_size=5,
    max_size=60,
)


@dataclass
class Writer:
    conn: sa.Connection
    tx: Any = None
    saves: list[tuple[Any, int]] = field(default_factory=list)  # (savepoint, events before it)
    written: list[Event] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)  # keys this transaction "holds" (row locks)


class Run:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.writers = [Writer(engine.connect()) for _ in range(WRITERS)]
        self.committed: list[Event] = []
        self.got: dict[str, list[tuple[int, Event]]] = {g: [] for g in GROUPS}
        self.counter = 0

    def held_elsewhere(self, w: Writer, key: str) -> bool:
        return any(key in o.keys for o in self.writers if o is not w)

    def apply(self, op: Op) -> None:
        kind = op[0]
        if kind == "claim":
            self.claim(op[1], op[2] % GROUPS[op[1]], op[3])
            return
        w = self.writers[op[1]]
        if kind in ("insert", "xid", "savepoint") and w.tx is None:
            w.tx = w.conn.begin()
        if kind == "insert":
            if self.held_elsewhere(w, op[2]):
                return  # a writer of this key would wait for the other one to end
            w.keys.add(op[2])
            batch = []
            for _ in range(op[3]):
                self.counter += 1
                batch.append(ev(op[2], self.counter))
            event_sql.insert_events(w.conn, batch, True)
            w.written += batch
        elif kind == "xid":
            w.conn.execute(sa.select(event_sql.CURRENT_XID))
        elif kind == "savepoint":
            w.saves.append((w.conn.begin_nested(), len(w.written)))
        elif kind == "rollback_to" and w.saves:
            save, n = w.saves.pop()
            save.rollback()
            del w.written[n:]
        elif kind in ("commit", "rollback") and w.tx is not None:
            w.conn.commit() if kind == "commit" else w.conn.rollback()
            if kind == "commit":
                self.committed += w.written
            w.tx, w.saves, w.written, w.keys = None, [], [], set()

    def claim(self, group: str, member: int, size: int) -> None:
        with self.engine.begin() as conn:
            claim, found = dbsql.claim_next(conn, group, f"m{member}", "*", size, 30.0)
            if claim is not None:
                assert found
                assert dbsql.finish(conn, group, claim.hi, claim.token)
        for _pos, event in found or []:
            self.got[group].append((member, event))

    def finish(self) -> None:
        for w in self.writers:
            if w.tx is not None:
                w.conn.commit()
                self.committed += w.written
            w.conn.close()
        for group in GROUPS:
            while True:
                before = len(self.got[group])
                self.claim(group, 0, 50)
                if len(self.got[group]) == before:
                    break


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(ops=ops)
# A transaction with the lower id writes a key after one with a higher id committed it: bus order
# within a batch must be seq order, not transaction-id order.
@example(
    ops=[
        ("xid", 0),
        ("insert", 1, "a", 1),
        ("commit", 1),
        ("insert", 0, "a", 1),
        ("commit", 0),
        ("claim", "one", 0, 4),
        ("claim", "two", 1, 1),
    ]
)
# A transaction in progress across several batches commits late: delivered, not skipped.
@example(
    ops=[
        ("insert", 0, "a", 2),
        ("insert", 1, "b", 1),
        ("commit", 1),
        ("claim", "one", 0, 1),
        ("insert", 2, "c", 1),
        ("commit", 2),
        ("claim", "one", 1, 4),
        ("commit", 0),
        ("claim", "two", 0, 1),
    ]
)
def test_interleavings_deliver_every_committed_event_once_in_order(
    cluster: Cluster, ops: list[Op]
) -> None:
    _reset(cluster.bus)
    with cluster.bus.begin() as conn:
        for group in GROUPS:
            dbsql.ensure_group(conn, group, StartPosition.NOW, None)
    run = Run(cluster.bus)
    try:
        for op in ops:
            run.apply(op)
    finally:
        run.finish()
    want = {e.id for e in run.committed}
    seq = {}
    with cluster.bus.connect() as conn:
        for i, s in conn.execute(sa.select(Event.id, Event.seq)):
            seq[i] = s
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(consumer_claims_table)).scalar()
            == 0
        )
        assert conn.execute(
            sa.select(sa.func.count()).select_from(consumers_table)
        ).scalar() == len(GROUPS)
    for group, got in run.got.items():
        ids = [e.id for _m, e in got]
        assert len(ids) == len(set(ids)), f"{group}: an event delivered twice"
        assert set(ids) == want, f"{group}: missing {want - set(ids)}, extra {set(ids) - want}"
        # every key's events (written one transaction after another) in the order written
        for key in KEYS:
            order = [seq[e.id] for _m, e in got if e.entity_id == key]
            assert order == sorted(order), f"{group}: key {key} out of order"
        # every transaction's events in seq order (rows of a transaction share its txid)
        by_tx: dict[int, list[int]] = {}
        with cluster.bus.connect() as conn:
            txids: dict[Any, int] = dict(
                conn.execute(
                    sa.select(Event.id, sa.column("txid")).select_from(Event.__table__)
                ).all()
            )
        for _m, e in got:
            by_tx.setdefault(txids[e.id], []).append(seq[e.id])
        assert all(v == sorted(v) for v in by_tx.values()), f"{group}: a transaction reordered"

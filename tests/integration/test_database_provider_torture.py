"""Out-of-order commits: the database bus must not skip a row whose transaction commits late.

8 writer threads insert events and hold their transactions open for a random time before they
commit (some roll back), so rows with lower ``seq`` regularly commit after rows with higher ones.
3 consumer groups of 2 members each (each member with a provider of its own, as separate processes
would have) read concurrently. Every group must receive every committed event exactly once, none
that rolled back, and the members of a group must share the work.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

import outbox
from outbox._sql import events as event_sql
from outbox.events import Event
from outbox.providers.base import StartPosition
from outbox.providers.database import DatabaseProvider
from tests.helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

EVENTS = 20_000
WRITERS = 8
GROUPS = ("billing", "search", "audit")
MEMBERS = 2
DEADLINE = 120.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, pool_size=WRITERS + 2 * len(GROUPS) * MEMBERS + 4)
    outbox.create_schema(eng)
    yield eng
    eng.dispose()


class Writers:
    """Writer threads; records the committed ids and the order of the commits."""

    def __init__(self, engine: sa.Engine, total: int) -> None:
        self.engine = engine
        self.remaining = total
        self.lock = threading.Lock()
        self.committed: set[uuid.UUID] = set()
        self.rolled_back: set[uuid.UUID] = set()
        self.commit_order: dict[uuid.UUID, int] = {}
        self.commits = itertools.count()
        self.errors: list[BaseException] = []

    def _take(self, n: int) -> int:
        with self.lock:
            n = min(n, self.remaining)
            self.remaining -= n
            return n

    def _give_back(self, n: int) -> None:
        with self.lock:
            self.remaining += n

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with self.engine.connect() as conn:
                while True:
                    n = self._take(rnd.randint(1, 8))
                    if n == 0:
                        return
                    batch = [outbox.new_event("database", f"public.t{rnd.randint(0, 9)}.update",
                                              {"w": seed}) for _ in range(n)]
                    tx = conn.begin()
                    event_sql.insert_events(conn, batch, True)
                    time.sleep(rnd.random() * 0.01)  # hold the transaction open
                    ids = [e.id for e in batch]
                    if rnd.random() < 0.05:
                        tx.rollback()
                        self._give_back(n)
                        with self.lock:
                            self.rolled_back.update(ids)
                        continue
                    tx.commit()
                    with self.lock:
                        order = next(self.commits)
                        self.committed.update(ids)
                        for i in ids:
                            self.commit_order[i] = order
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


async def test_every_group_gets_every_late_commit_exactly_once(engine: sa.Engine) -> None:
    received: dict[str, Counter[uuid.UUID]] = {g: Counter() for g in GROUPS}
    by_member: Counter[str] = Counter()
    providers = [DatabaseProvider(engine, poll_interval=0.5) for _ in GROUPS for _ in
                 range(MEMBERS)]
    iterators: list[Any] = []
    for i, p in enumerate(providers):
        group = GROUPS[i // MEMBERS]
        iterators.append((group, f"{group}-{i % MEMBERS}",
                          p.consume(group=group, consumer=f"{group}-{i % MEMBERS}",
                                    start=StartPosition.BEGINNING)))

    async def member(group: str, name: str, it: Any) -> None:
        async for delivery in it:
            received[group][delivery.event.id] += 1
            by_member[name] += 1
            await delivery.ack()

    writers = Writers(engine, EVENTS)
    threads = [threading.Thread(target=writers.run, args=(seed,)) for seed in range(WRITERS)]
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for group, name, it in iterators:
            tg.start_soon(member, group, name, it)
        for t in threads:
            t.start()
        for t in threads:
            await anyio.to_thread.run_sync(t.join)
        assert not writers.errors, writers.errors
        assert len(writers.committed) == EVENTS
        await eventually(lambda: all(len(received[g]) >= EVENTS for g in GROUPS),
                         within=DEADLINE - (time.monotonic() - started), every=0.05,
                         what=lambda: "every group to get every event: "
                         f"{ {g: len(received[g]) for g in GROUPS} } of {EVENTS}")
        await anyio.sleep(0.5)  # room for a duplicate to show up (the window under test)
        tg.cancel_scope.cancel()
    for _group, _name, it in iterators:
        await it.aclose()
    for p in providers:
        await p.close()

    for group in GROUPS:
        got = received[group]
        missing = writers.committed - set(got)
        assert not missing, f"{group}: {len(missing)} committed events never delivered"
        assert not set(got) & writers.rolled_back, f"{group}: rolled-back events delivered"
        assert set(got) == writers.committed
        duplicates = {i: n for i, n in got.items() if n > 1}
        assert not duplicates, f"{group}: {len(duplicates)} events delivered more than once"
    for group in GROUPS:  # the members of each group shared the work
        assert all(by_member[f"{group}-{m}"] > 0 for m in range(MEMBERS)), dict(by_member)

    # The run really had late commits: transactions whose rows have lower seq than rows of a
    # transaction that committed before them.
    with engine.connect() as conn:
        seqs = dict(conn.execute(sa.select(Event.__table__.c.id, Event.__table__.c.seq)).all())
    first_seq: dict[int, int] = defaultdict(lambda: 2**62)
    for event_id, order in writers.commit_order.items():
        first_seq[order] = min(first_seq[order], seqs[event_id])
    by_seq = sorted(first_seq, key=first_seq.__getitem__)
    late = sum(1 for a, b in itertools.pairwise(by_seq) if a > b)
    assert late > 100, f"only {late} late commits: the test did not exercise the problem"

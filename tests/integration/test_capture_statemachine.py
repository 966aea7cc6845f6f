"""Random sessions against capture: after every commit the events replay to the committed tables.

A hypothesis state machine adds, modifies and deletes rows of three models (autoincrement,
composite and UUID primary keys), flushes, opens / releases / rolls back savepoints, expires
objects, runs ORM bulk UPDATE/DELETE, rolls back and commits, in random order. After each commit
the ``events`` table, replayed in ``seq`` order from nothing, must reproduce the tables exactly:

- a create for a key that does not exist yet, a delete carrying exactly the stored row, an update
  whose ``changes`` name every column that differs from the previous state (old value = the
  state before, new value = the payload) and nothing else;
- nothing from rolled-back work (a leaked event would leave a row the table does not have, or
  make a later create/delete/update inconsistent), nothing missing, per-key order by ``seq``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox import _json
from outbox.events import Event
from tests.integration.capture_models import Base, Doc, Tag, User, make_engine

# Keeps the session's objects in step with the rows a bulk statement touched.
FETCH = {"synchronize_session": "fetch"}
MODELS: tuple[type[Any], ...] = (User, Tag, Doc)
# Examples per dialect: >= 300 in total, in well under a minute.
EXAMPLES = {"sqlite": 200, "postgresql": 120}

names = st.sampled_from(["a", "b", "c", ""])  # few values: many updates that change nothing
emails = st.one_of(st.none(), st.sampled_from(["x@y", "z@y"]))
weights = st.integers(0, 3)
data = st.one_of(st.none(), st.fixed_dictionaries({"k": st.integers(0, 2)}))


def entity_id(model: type[Any], row: Any) -> str:
    mapper = sa.inspect(model)
    values = [_json.to_jsonable(getattr(row, c.key)) for c in mapper.primary_key]
    if len(values) == 1:
        return values[0] if isinstance(values[0], str) else json.dumps(values[0])
    return json.dumps(values, separators=(",", ":"))


def table_state(conn: sa.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    """The committed rows of every model, as events would describe them."""
    state = {}
    for model in MODELS:
        table = model.__table__
        for row in conn.execute(sa.select(table)):
            payload = {c.name: _json.to_jsonable(row._mapping[c]) for c in table.columns}
            state[(table.name, entity_id(model, row))] = payload
    return state


def replay(events: list[Event]) -> dict[tuple[str, str], dict[str, Any]]:
    state: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in events:
        assert ev.entity is not None and ev.entity_id is not None
        key = (ev.entity, ev.entity_id)
        assert ev.ordering_key == f"{ev.schema_name}.{ev.entity}:{ev.entity_id}"
        if ev.operation == "create":
            assert key not in state, f"create of an existing row: {ev.type} {key}"
            state[key] = ev.payload
        elif ev.operation == "update":
            assert key in state, f"update of a missing row: {key}"
            before = state[key]
            changes = ev.meta["changes"]
            assert changes, f"update event without a change: {ev.seq}"
            differing = {c for c in ev.payload if ev.payload[c] != before.get(c)}
            assert set(changes) == differing, (ev.seq, changes, before, ev.payload)
            for column, change in changes.items():
                assert change == {"old": before[column], "new": ev.payload[column]}
            state[key] = ev.payload
        else:
            assert ev.operation == "delete"
            assert state.pop(key, None) == ev.payload, f"delete payload differs: {key}"
    return state


class CaptureMachine(RuleBasedStateMachine):
    engine: sa.Engine
    factory: sessionmaker[Session]

    def __init__(self) -> None:
        super().__init__()
        self.session = self.factory()
        self.savepoints: list[Any] = []
        self.owner_ids = itertools.count(1)
        self.objects: list[Any] = []  # strong references, in creation order (deterministic)

    @initialize()
    def seed(self) -> None:
        with self.engine.begin() as conn:
            for model in (*MODELS, Event):
                conn.execute(sa.delete(model.__table__))
        # Committed (hence expired) rows of every model from the first step on.
        self.add(User(name="a"), User(name="b", email="x@y"),
                 Tag(owner_id=next(self.owner_ids), name="t", weight=1),
                 Tag(owner_id=next(self.owner_ids), name="u", weight=2),
                 Doc(title="a", data={"k": 1}, body="long"), Doc(title="b"))
        self.commit()

    def teardown(self) -> None:
        try:
            if self.session.in_transaction():
                self.commit()
        finally:
            self.session.close()

    # -- helpers ---------------------------------------------------------------------------

    def add(self, *objs: Any) -> None:
        self.objects.extend(objs)
        self.session.add_all(objs)

    def live(self) -> list[Any]:
        s = self.session
        return [o for o in self.objects if o in s and o not in s.deleted
                and not sa.inspect(o).was_deleted]

    # -- rules -----------------------------------------------------------------------------

    @rule(name=names, email=emails)
    def add_user(self, name: str, email: str | None) -> None:
        self.add(User(name=name, email=email))

    @rule(name=names, weight=weights)
    def add_tag(self, name: str, weight: int) -> None:
        self.add(Tag(owner_id=next(self.owner_ids), name=name or "t", weight=weight))

    @rule(title=names, doc=data)
    def add_doc(self, title: str, doc: Any) -> None:
        self.add(Doc(title=title, data=doc, body=title * 3))

    @rule(pick=st.data(), count=st.integers(1, 3))
    def modify(self, pick: st.DataObject, count: int) -> None:
        objs = self.live()
        for _ in range(count if objs else 0):
            self.modify_one(pick.draw(st.sampled_from(objs)), pick.draw(names),
                            pick.draw(weights), pick.draw(data), pick.draw(st.booleans()))

    def modify_one(self, obj: Any, value: str, weight: int, doc: Any, first: bool) -> None:
        if isinstance(obj, User):
            if first:
                obj.name = value
            else:
                obj.email = value or None
        elif isinstance(obj, Tag):
            obj.weight = weight
        elif first:
            obj.data = doc
        else:
            obj.body = value  # deferred column, usually not loaded

    @rule(pick=st.data())
    def delete(self, pick: st.DataObject) -> None:
        objs = self.live()
        if not objs:
            return
        obj = pick.draw(st.sampled_from(objs))
        if sa.inspect(obj).pending:
            self.session.expunge(obj)
        else:
            self.session.delete(obj)

    @rule(name=names, email=emails)
    def bulk_update(self, name: str, email: str | None) -> None:
        self.session.execute(sa.update(User).where(User.name == name).values(email=email),
                             execution_options=FETCH)

    @rule(weight=weights)
    def bulk_delete(self, weight: int) -> None:
        self.session.execute(sa.delete(Tag).where(Tag.weight == weight),
                             execution_options=FETCH)

    @rule()
    def flush(self) -> None:
        self.session.flush()

    @rule()
    def expire_all(self) -> None:
        self.session.expire_all()

    @precondition(lambda self: len(self.savepoints) < 3)
    @rule()
    def begin_nested(self) -> None:
        self.savepoints.append(self.session.begin_nested())

    @precondition(lambda self: bool(self.savepoints))
    @rule()
    def rollback_savepoint(self) -> None:
        self.savepoints.pop().rollback()

    @precondition(lambda self: bool(self.savepoints))
    @rule()
    def release_savepoint(self) -> None:
        self.savepoints.pop().commit()

    @rule()
    def rollback(self) -> None:
        self.session.rollback()
        self.savepoints.clear()

    @rule()
    def commit(self) -> None:
        self.session.commit()
        self.savepoints.clear()
        self.check()

    def check(self) -> None:
        with Session(self.engine) as s:  # a session capture does not touch
            events = list(s.scalars(sa.select(Event).order_by(Event.seq)))
            assert replay(events) == table_state(s.connection())

    @invariant()
    def other_connections_see_only_committed_work(self) -> None:
        # PostgreSQL only: on SQLite a second connection would wait for the single writer.
        if self.engine.dialect.name != "postgresql":
            return
        with Session(self.engine) as s:
            events = list(s.scalars(sa.select(Event).order_by(Event.seq)))
            assert replay(events) == table_state(s.connection())


@pytest.fixture
def machine_db(db_url: str) -> Iterator[tuple[sa.Engine, sessionmaker[Session]]]:
    engine = make_engine(db_url)
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    # every column, so that replaying the events rebuilds the tables (password looks secret)
    handle = outbox.capture(factory, models=list(MODELS), include={User: {"password"}})
    try:
        yield engine, factory
    finally:
        handle.remove()
        engine.dispose()


@pytest.mark.slow
def test_events_replay_to_the_committed_tables(
    machine_db: tuple[sa.Engine, sessionmaker[Session]],
) -> None:
    engine, factory = machine_db
    CaptureMachine.engine = engine
    CaptureMachine.factory = factory
    run_state_machine_as_test(
        CaptureMachine,
        settings=settings(
            max_examples=EXAMPLES[engine.dialect.name],
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )

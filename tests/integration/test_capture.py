"""outbox.capture on real databases: one event per flushed change, in the change's transaction."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, attributes

import outbox
from outbox.events import Event
from tests.integration.capture_models import (
    Child,
    Db,
    Doc,
    Parent,
    Stamped,
    Tag,
    User,
    any_url,  # noqa: F401 - fixture
    make_db,
)


@pytest.fixture
def db(any_url: str) -> Iterator[Db]:  # noqa: F811
    yield from make_db(any_url, exclude={User: {"password"}})


@pytest.fixture
def pg_or_sqlite(db_url: str) -> Iterator[Db]:
    yield from make_db(db_url, exclude={User: {"password"}})


def _users(db: Db) -> list[tuple[int, str]]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(User.id, User.name).order_by(User.id))]


def test_insert_writes_one_complete_event_row(db: Db) -> None:
    with db.Session() as s:
        user = User(name="ann", email="ann@example.com", password="hunter2")
        s.add(user)
        s.commit()
        user_id = user.id
    [ev] = db.events()
    schema = db.default_schema
    assert isinstance(ev.id, uuid.UUID)
    assert ev.seq == 1
    assert ev.source == "database"
    assert ev.type == f"{schema}.cap_users.create"
    assert ev.status == "pending"
    # Autoincrement key in payload and entity_id; the excluded column is absent.
    assert ev.payload == {"id": user_id, "name": "ann", "email": "ann@example.com"}
    assert ev.entity_id == str(user_id)
    assert (ev.schema_name, ev.entity, ev.operation) == (schema, "cap_users", "create")
    assert ev.ordering_key == f"{schema}.cap_users:{user_id}"
    assert ev.instance_id == outbox.events.get_instance_id()
    assert ev.meta == {}
    assert ev.user_id is None and ev.session_id is None
    assert ev.retry_count == 0
    assert ev.created_at.tzinfo is not None
    assert ev.next_attempt_at == ev.created_at
    assert ev.processed_at is None and ev.completed_at is None and ev.error is None


def test_rollback_writes_neither_change_nor_event(db: Db) -> None:
    with db.Session() as s:
        s.add(User(name="gone"))
        s.flush()  # the event row is already written, inside the transaction
        assert s.scalar(sa.select(sa.func.count()).select_from(Event)) == 1
        s.rollback()
    assert _users(db) == []
    assert db.count() == 0


def test_savepoint_rollback_removes_only_its_events(db: Db) -> None:
    with db.Session() as s:
        s.add(User(name="kept"))
        s.flush()
        nested = s.begin_nested()
        s.add(User(name="dropped"))
        s.flush()
        nested.rollback()
        with s.begin_nested():
            s.add(User(name="also kept"))
        s.commit()
    names = [n for _, n in _users(db)]
    assert names == ["kept", "also kept"]
    assert [e.payload["name"] for e in db.events()] == ["kept", "also kept"]


def test_sqlite_savepoint_first_in_a_transaction_with_the_recipe(sqlite_url: str) -> None:
    """A savepoint opened before anything else in the transaction: rolling back the transaction
    removes the change and its event only with ``outbox.sqlite.sqlite_savepoints`` (docs/capture.md,
    "SQLite and savepoints")."""
    for recommended in (False, True):
        engine = sa.create_engine(sqlite_url.replace(".db", f"-{recommended}.db"))
        if recommended:
            assert outbox.sqlite.sqlite_savepoints(engine) is engine
            outbox.sqlite.sqlite_savepoints(engine)  # twice: no second BEGIN
        outbox.create_schema(engine)
        User.metadata.create_all(engine)
        factory = sa.orm.sessionmaker(engine)
        handle = outbox.capture(factory)
        try:
            with factory() as s:
                with s.begin_nested():
                    s.add(User(name="savepoint first"))
                s.rollback()
            with engine.connect() as conn:
                kept = (conn.scalar(sa.select(sa.func.count()).select_from(User)),
                        conn.scalar(sa.select(sa.func.count()).select_from(Event)))
        finally:
            handle.remove()
            engine.dispose()
        # pysqlite alone: the savepoint began the transaction and its RELEASE committed it
        assert kept == ((0, 0) if recommended else (1, 1))
    other = sa.create_engine("postgresql+psycopg://outbox@127.0.0.1:1/nowhere")
    assert outbox.sqlite.sqlite_savepoints(other) is other  # other dialects: left alone
    assert not sa.event.contains(other, "begin", outbox.sqlite._begin)


def test_every_flush_of_a_transaction_is_captured(db: Db) -> None:
    with db.Session() as s:
        user = User(name="a")
        s.add(user)
        s.flush()
        user.name = "b"
        s.flush()
        user.name = "c"  # flushed by commit itself
        s.commit()
    assert [(e.operation, e.payload["name"]) for e in db.events()] == [
        ("create", "a"), ("update", "b"), ("update", "c")
    ]


def test_update_records_changes_and_skips_no_op_updates(db: Db) -> None:
    with db.Session() as s:
        user = User(name="a", email="a@x")
        s.add(user)
        s.commit()
        user.name = user.name  # same value
        s.commit()
        user.email = "tmp"
        user.email = "a@x"  # changed back before the flush
        s.commit()
        user.name = "b"
        s.commit()
        user_id = user.id
    events = db.events()
    assert [e.operation for e in events] == ["create", "update"]
    assert events[1].meta == {"changes": {"name": {"old": "a", "new": "b"}}}
    assert events[1].payload == {"id": user_id, "name": "b", "email": "a@x"}


def test_old_values_are_exact_for_expired_instances(db: Db) -> None:
    with db.Session() as s:
        user = User(name="a")
        s.add(user)
        s.flush()
        user_id = user.id
        s.commit()  # expires user
        # Another transaction changes the row; our copy is expired, not stale.
        with db.engine.begin() as conn:
            conn.execute(sa.update(User).where(User.id == user_id).values(name="z"))
        user.name = "b"
        s.commit()
    update = db.events()[-1]
    assert update.meta["changes"] == {"name": {"old": "z", "new": "b"}}


def test_delete_captures_the_stored_row_not_unflushed_changes(db: Db) -> None:
    with db.Session() as s:
        user = User(name="stored", email="e")
        s.add(user)
        s.commit()
        user_id = user.id
        user.name = "never flushed"
        s.delete(user)
        s.commit()
    delete = db.events()[-1]
    assert delete.operation == "delete"
    assert delete.type.endswith(".cap_users.delete")
    assert delete.payload == {"id": user_id, "name": "stored", "email": "e"}
    assert delete.meta == {}


def test_delete_of_an_expired_instance_loads_the_stored_row(db: Db) -> None:
    with db.Session() as s:
        user = User(name="x", email="y")
        s.add(user)
        s.commit()
        user_id = user.id
    with db.Session() as s:
        user = s.get(User, user_id)
        assert user is not None
        s.expire(user)
        s.delete(user)
        s.commit()
    assert db.events()[-1].payload == {"id": user_id, "name": "x", "email": "y"}


def test_exclude_keeps_secrets_out_of_payload_and_changes(db: Db) -> None:
    with db.Session() as s:
        user = User(name="a", password="one")
        s.add(user)
        s.commit()
        user.password = "two"
        user.name = "b"
        s.commit()
        user.password = "three"  # only the secret changed: an update without visible changes
        s.commit()
    events = db.events()
    assert [e.operation for e in events] == ["create", "update", "update"]
    for ev in events:
        assert "password" not in ev.payload
        for value in ("one", "two", "three"):
            assert value not in json.dumps(ev.payload) + json.dumps(ev.meta)
    # An excluded column that changed says so, without its values.
    assert events[1].meta["changes"] == {"name": {"old": "a", "new": "b"},
                                         "password": {"redacted": True}}
    assert events[2].meta["changes"] == {"password": {"redacted": True}}


def test_columns_that_look_like_secrets_are_left_out_by_default(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.capture")
    dbs = make_db(db_url)  # no exclude=
    db = next(dbs)
    try:
        with db.Session() as s:
            user = User(name="a", password="one")
            s.add(user)
            s.commit()
            user.password = "two"
            s.commit()
            user_id = user.id
            s.execute(sa.update(User).where(User.id == user_id).values(password="three"))
            s.commit()
        events = db.events()
        assert [e.operation for e in events] == ["create", "update", "update"]
        assert events[0].payload == {"id": user_id, "name": "a", "email": None}
        assert [e.meta["changes"] for e in events[1:]] == [{"password": {"redacted": True}}] * 2
        assert "User.password" in caplog.text and "include={User: {'password'}}" in caplog.text
    finally:
        dbs.close()
    included = make_db(db_url, include={User: {"password"}})
    db = next(included)
    try:
        with db.Session() as s:
            s.add(User(name="b", password="kept"))
            s.commit()
        assert db.events()[-1].payload["password"] == "kept"
    finally:
        included.close()


def test_composite_and_uuid_primary_keys(db: Db) -> None:
    with db.Session() as s:
        s.add(Tag(owner_id=5, name="x", weight=1))
        doc = Doc(title="t")
        s.add(doc)
        s.commit()
        doc_id = doc.id
    by_entity = {e.entity: e for e in db.events()}
    assert by_entity["cap_tags"].entity_id == '[5,"x"]'
    assert json.loads(by_entity["cap_tags"].entity_id) == [5, "x"]
    assert by_entity["cap_tags"].ordering_key.endswith('cap_tags:[5,"x"]')
    assert by_entity["cap_docs"].entity_id == str(doc_id)
    assert by_entity["cap_docs"].payload["id"] == str(doc_id)


def test_one_event_insert_statement_per_flush(db: Db) -> None:
    statements: list[str] = []

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO EVENTS"):
            statements.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", count)
    try:
        with db.Session() as s:
            s.add_all([User(name=f"u{i}") for i in range(50)])
            s.add_all([Tag(owner_id=i, name="t") for i in range(10)])
            s.commit()
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", count)
    assert len(statements) == 1
    assert db.count() == 60


def test_database_generated_values_are_in_the_payload(db: Db) -> None:
    with db.Session() as s:
        row = Stamped(name="a")
        s.add(row)
        s.commit()
        row.name = "b"
        s.commit()
        row.name = "c"
        s.commit()
        row_id = row.id
    create, first, second = db.events()
    assert create.payload == {"id": row_id, "name": "a", "kind": "plain", "revision": 0}
    assert first.payload["revision"] == 1
    assert first.meta["changes"] == {
        "name": {"old": "a", "new": "b"},
        "revision": {"old": 0, "new": 1},
    }
    assert second.meta["changes"]["revision"] == {"old": 1, "new": 2}


def test_deferred_columns_are_read_for_the_payload(db: Db) -> None:
    with db.Session() as s:
        doc = Doc(title="t", body="long text")
        s.add(doc)
        s.commit()
        doc_id = doc.id
    with db.Session() as s:
        loaded = s.get(Doc, doc_id)
        assert loaded is not None
        assert "body" not in loaded.__dict__  # deferred, not loaded
        loaded.title = "t2"
        s.commit()
    update = db.events()[-1]
    assert update.payload["body"] == "long text"
    assert update.meta["changes"] == {"title": {"old": "t", "new": "t2"}}


def test_in_place_mutation_of_json_has_exact_old_value(db: Db) -> None:
    with db.Session() as s:
        doc = Doc(title="t", data={"n": 1})
        s.add(doc)
        s.commit()
        doc.data["n"] = 2  # mutated in place: the ORM keeps no copy of the old value
        attributes.flag_modified(doc, "data")
        s.commit()
    update = db.events()[-1]
    assert update.meta["changes"] == {"data": {"old": {"n": 1}, "new": {"n": 2}}}


def test_cascades_orphans_and_foreign_key_moves_are_captured(db: Db) -> None:
    with db.Session() as s:
        p1 = Parent(name="p1", children=[Child(name="c1"), Child(name="c2")])
        p2 = Parent(name="p2")
        s.add_all([p1, p2])
        s.commit()
        c1, c2 = p1.children
        c1_id, c2_id, p1_id, p2_id = c1.id, c2.id, p1.id, p2.id
        p2.children.append(c1)  # moves c1: its parent_id changes during the flush
        s.commit()
        p1.children.remove(c2)  # orphan: deleted by the flush, never passed to session.delete
        s.commit()
        s.delete(p2)  # cascades to c1
        s.commit()
    child_events = [(e.operation, e.entity_id, e.meta.get("changes")) for e in db.events()
                    if e.entity == "cap_children"]
    assert child_events == [
        ("create", str(c1_id), None),
        ("create", str(c2_id), None),
        ("update", str(c1_id), {"parent_id": {"old": p1_id, "new": p2_id}}),
        ("delete", str(c2_id), None),
        ("delete", str(c1_id), None),
    ]
    parent_deletes = [e.entity_id for e in db.events(entity="cap_parents", operation="delete")]
    assert parent_deletes == [str(p2_id)]


def test_context_fills_user_session_and_metadata(db: Db) -> None:
    with db.Session() as s:
        with outbox.context(user_id=42, session_id="sess-1", metadata={"request": "r1"}):
            s.add(User(name="a"))
            s.flush()
            with outbox.context(metadata={"step": 2}):
                s.add(User(name="b"))
                s.flush()
        s.add(User(name="c"))
        s.commit()
    a, b, c = db.events()
    assert (a.user_id, a.session_id, a.meta) == ("42", "sess-1", {"request": "r1"})
    assert (b.user_id, b.meta) == ("42", {"request": "r1", "step": 2})
    assert (c.user_id, c.session_id, c.meta) == (None, None, {})


def test_custom_events_join_the_transaction(db: Db) -> None:
    with db.Session() as s:
        s.add(outbox.new_event("system", "billing.invoice.sent", {"n": 1}))
        s.rollback()
        s.add(outbox.new_event("system", "billing.invoice.sent", {"n": 2}))
        s.commit()
    [ev] = db.events()  # and no event about the event row itself
    assert (ev.type, ev.payload) == ("billing.invoice.sent", {"n": 2})


def test_remove_stops_capture(db: Db) -> None:
    db.capture.remove()
    db.capture.remove()  # idempotent
    with db.Session() as s:
        s.add(User(name="a"))
        s.commit()
    assert db.count() == 0


def test_unserialisable_value_fails_the_flush_and_commits_nothing(sqlite_url: str) -> None:
    from tests.integration.capture_models import Opaque, Pickled

    for db in make_db(sqlite_url):
        with db.Session() as s:
            s.add(User(name="innocent"))
            s.add(Pickled(thing=Opaque(1)))
            with pytest.raises(outbox.exceptions.SerializationError) as err:
                s.commit()
            s.rollback()
        message = str(err.value)
        assert "Pickled.thing" in message
        assert "Opaque" in message
        assert err.value.model == "Pickled" and err.value.column == "thing"
        assert _users(db) == [] and db.count() == 0


def test_nan_is_refused_at_flush(pg_or_sqlite: Db) -> None:
    from tests.integration.capture_models import Kinds

    db = pg_or_sqlite  # MariaDB cannot even store NaN
    with db.Session() as s:
        s.add(Kinds(ratio=float("nan")))
        with pytest.raises(outbox.exceptions.SerializationError, match=r"Kinds\.ratio"):
            s.flush()
        s.rollback()
    assert db.count() == 0


def test_models_and_operations_limit_what_is_captured(sqlite_url: str) -> None:
    for db in make_db(sqlite_url, models=[User], operations=("create", "delete")):
        with db.Session() as s:
            user = User(name="a")
            s.add_all([user, Tag(owner_id=1, name="t")])
            s.commit()
            user.name = "b"
            s.commit()
            s.delete(user)
            s.commit()
        assert [(e.entity, e.operation) for e in db.events()] == [
            ("cap_users", "create"), ("cap_users", "delete")
        ]


def test_models_as_declarative_base(sqlite_url: str) -> None:
    from tests.integration.capture_models import Base

    for db in make_db(sqlite_url, models=Base):
        with db.Session() as s:
            s.add_all([User(name="a"), Tag(owner_id=1, name="t")])
            s.commit()
        assert sorted(e.entity for e in db.events()) == ["cap_tags", "cap_users"]


def test_session_instance_class_and_scoped_session_targets(sqlite_url: str) -> None:
    for db in make_db(sqlite_url):
        db.capture.remove()
        engine = db.engine

        # A single session.
        single = Session(engine)
        handle = outbox.capture(single)
        single.add(User(name="instance"))
        single.commit()
        with Session(engine) as other:
            other.add(User(name="not captured"))
            other.commit()
        single.close()
        handle.remove()

        # A Session subclass.
        class AppSession(Session):
            pass

        handle = outbox.capture(AppSession)
        with AppSession(engine) as s:
            s.add(User(name="subclass"))
            s.commit()
        handle.remove()

        # A scoped_session.
        scoped = sa.orm.scoped_session(sa.orm.sessionmaker(engine))
        handle = outbox.capture(scoped)
        scoped.add(User(name="scoped"))
        scoped.commit()
        scoped.remove()
        handle.remove()

        assert [e.payload["name"] for e in db.events()] == ["instance", "subclass", "scoped"]


def test_capture_twice(sqlite_url: str) -> None:
    for db in make_db(sqlite_url):
        # Same target and arguments: the same registration, events written once.
        again = outbox.capture(db.Session)
        assert again is db.capture
        # Different arguments for the same target: refused.
        with pytest.raises(outbox.exceptions.CaptureError, match="already captured"):
            outbox.capture(db.Session, operations=("create",))
        # A Session class covering the sessionmaker: refused (every event would be doubled).
        with pytest.raises(outbox.exceptions.CaptureError, match="already captured"):
            outbox.capture(Session)
        with db.Session() as s:
            s.add(User(name="once"))
            s.commit()
        assert db.count() == 1


def test_changes_are_serialised_like_payloads(db: Db) -> None:
    from tests.integration.capture_models import Kinds

    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    with db.Session() as s:
        row = Kinds(naive=when)
        s.add(row)
        s.commit()
        row.naive = when + dt.timedelta(days=1)
        s.commit()
    update = db.events()[-1]
    assert update.meta["changes"] == {
        "naive": {"old": "2026-01-02T03:04:05", "new": "2026-01-03T03:04:05"}
    }


def test_joined_inheritance(db: Db) -> None:
    from tests.integration.capture_models import Employee, Manager

    with db.Session() as s:
        boss = Manager(name="b", reports=3)
        s.add_all([Employee(name="e"), boss])
        s.commit()
        boss.reports = 4
        s.commit()
        boss_id = boss.id
        # A bulk UPDATE touches one table: its RETURNING cannot give the whole row.
        with pytest.raises(outbox.exceptions.UnsupportedOperation, match="several tables"):
            s.execute(sa.update(Manager).where(Manager.id == boss_id).values(reports=5))
        s.rollback()
    events = [(e.entity, e.operation, e.payload, e.meta) for e in db.events()]
    assert events == [
        ("cap_employees", "create", {"id": events[0][2]["id"], "name": "e", "kind": "employee"},
         {}),
        ("cap_managers", "create",
         {"id": boss_id, "name": "b", "kind": "manager", "reports": 3}, {}),
        ("cap_managers", "update",
         {"id": boss_id, "name": "b", "kind": "manager", "reports": 4},
         {"changes": {"reports": {"old": 3, "new": 4}}}),
    ]


def test_each_database_of_a_multi_bind_session_gets_its_own_events(tmp_path: Path) -> None:
    from tests.integration.capture_models import Base, make_engine

    users_db = make_engine(f"sqlite:///{tmp_path}/users.db")
    tags_db = make_engine(f"sqlite:///{tmp_path}/tags.db")
    for eng in (users_db, tags_db):
        outbox.create_schema(eng)
        Base.metadata.create_all(eng)
    factory = sa.orm.sessionmaker(binds={User: users_db, Tag: tags_db})
    handle = outbox.capture(factory)
    try:
        with factory() as s:
            s.add_all([User(name="u"), Tag(owner_id=1, name="t")])
            s.commit()
    finally:
        handle.remove()
    for eng, entity in ((users_db, "cap_users"), (tags_db, "cap_tags")):
        with Session(eng) as s:
            assert [e.entity for e in s.scalars(sa.select(Event))] == [entity]
        eng.dispose()


def test_awkward_text_survives_the_trip(db: Db) -> None:
    name = "100% 'quoted' \"double\" \\ é ✓ %(rows)s"
    with db.Session() as s:
        s.add_all([User(name=name), User(name="second")])  # one- and multi-row statements
        s.commit()
        s.add(User(name=name))
        s.commit()
    assert [e.payload["name"] for e in db.events()] == [name, "second", name]

"""Capture in an application's shapes: each event says what the database stored, for every row
the unit of work changed, and for nothing else (docs/capture.md, "What an event holds")."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox._capture.flush import UncapturedSessionWarning
from outbox.events import Event
from tests.integration.fidelity_models import (
    Base,
    Chef,
    Favorite,
    Gadget,
    Person,
    Recipe,
    Step,
    Tag,
)


@pytest.fixture(params=["psycopg", "psycopg2", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        found: str = request.getfixturevalue("sqlite_url")
        return found
    pg: str = request.getfixturevalue("pg_url")
    return pg.replace("+psycopg", "+" + request.param)


@pytest.fixture(params=["psycopg", "psycopg2"])
def pg(request: pytest.FixtureRequest, pg_url: str) -> str:
    return pg_url.replace("+psycopg", "+" + request.param)


def _engine(url: str) -> Iterator[sa.Engine]:
    engine = outbox.sqlite.sqlite_savepoints(sa.create_engine(url))
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    yield from _engine(url)


@pytest.fixture
def pg_engine(pg: str) -> Iterator[sa.Engine]:
    yield from _engine(pg)


@pytest.fixture
def factory(engine: sa.Engine) -> Iterator[sessionmaker[Session]]:
    made = sessionmaker(engine)
    with outbox.capture(made, models=Base):
        yield made


def events(engine: sa.Engine, **where: Any) -> list[Event]:
    with Session(engine) as s:
        stmt = sa.select(Event).order_by(Event.seq)
        for key, value in where.items():
            stmt = stmt.where(getattr(Event, key) == value)
        return list(s.scalars(stmt))


def _people(s: Session, *names: str) -> list[Person]:
    people = [Person(name=n) for n in names]
    s.add_all(people)
    s.commit()
    return people


# -- (1) values of batched UPDATEs ------------------------------------------------------------


def test_batched_update_events_carry_each_rows_onupdate_value(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    """One flush renames three rows: one executemany UPDATE. SQLAlchemy gives every object the
    first row's ``onupdate`` value; the events say what each row stored."""
    with factory() as s:
        people = _people(s, "ada", "bob", "cy")
        names = [p.name for p in people]  # loads them: no autoflush between the renames
        for person, name in zip(people, names, strict=True):
            person.name = f"{name}-2"
        s.commit()
    with engine.connect() as conn:
        stored = conn.execute(sa.select(Person.shout, Person.updated_at).order_by(Person.id)).all()
    assert [r.shout for r in stored] == ["ADA-2", "BOB-2", "CY-2"]
    updates = events(engine, operation="update")
    assert [e.payload["shout"] for e in updates] == ["ADA-2", "BOB-2", "CY-2"]
    assert [e.meta["changes"]["shout"]["new"] for e in updates] == ["ADA-2", "BOB-2", "CY-2"]
    # naive UTC as the TypeDecorator stores it, each row its own
    assert [e.payload["updated_at"] for e in updates] == [
        r.updated_at.replace(tzinfo=None).isoformat() for r in stored]


# -- (2) association rows -----------------------------------------------------------------------


def test_association_rows_get_create_and_delete_events(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    schema = engine.dialect.default_schema_name
    with factory() as s:
        soup, salt, pepper = Recipe(title="soup"), Tag(name="salt"), Tag(name="pepper")
        s.add_all([soup, salt, pepper])
        s.commit()
        soup.tags.append(salt)  # only a link row changes in this flush
        s.commit()
        soup.tags.extend([pepper])
        soup.tags.remove(salt)
        s.commit()
        ids = (soup.id, salt.id, pepper.id)
    links = events(engine, entity="fid_recipe_tags")
    assert [(e.type, e.entity_id, e.payload) for e in links] == [
        (f"{schema}.fid_recipe_tags.create", json.dumps([ids[0], ids[1]]).replace(" ", ""),
         {"recipe_id": ids[0], "tag_id": ids[1]}),
        (f"{schema}.fid_recipe_tags.delete", json.dumps([ids[0], ids[1]]).replace(" ", ""),
         {"recipe_id": ids[0], "tag_id": ids[1]}),
        (f"{schema}.fid_recipe_tags.create", json.dumps([ids[0], ids[2]]).replace(" ", ""),
         {"recipe_id": ids[0], "tag_id": ids[2]}),
    ]
    assert all(e.ordering_key == f"{schema}.fid_recipe_tags:{e.entity_id}" for e in links)


def test_associations_false_leaves_out_unmapped_association_tables(engine: sa.Engine) -> None:
    made = sessionmaker(engine)
    with outbox.capture(made, models=Base, associations=False), made() as s:
        person, soup = Person(name="p"), Recipe(title="soup", tags=[Tag(name="t")])
        s.add_all([person, soup])
        s.commit()
        person.favorites.append(soup)  # a mapped, captured model: still captured
        s.commit()
    entities = {e.entity for e in events(engine)}
    assert "fid_recipe_tags" not in entities
    assert "fid_favorites" in entities
    with pytest.raises(outbox.exceptions.CaptureError, match="associations"):
        outbox.capture(made, associations="no")  # type: ignore[arg-type]


def test_model_used_as_secondary_gets_one_event_per_row(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        ada = Person(name="ada")
        soup, stew = Recipe(title="soup"), Recipe(title="stew")
        s.add_all([ada, soup, stew])
        s.commit()
        ada.favorites.append(soup)  # through the relationship
        s.add(Favorite(person_id=ada.id, recipe_id=stew.id))  # as an object
        s.commit()
        ada.favorites.remove(soup)  # deleted through the relationship
        s.commit()
        s.delete(s.get(Favorite, (ada.id, stew.id)))  # deleted as an object
        s.commit()
        ids = (ada.id, soup.id, stew.id)
    rows = [(e.operation, e.entity_id, e.payload["person_id"], e.payload["recipe_id"])
            for e in events(engine, entity="fid_favorites")]
    assert sorted(rows[:2]) == sorted([
        ("create", f"[{ids[0]},{ids[1]}]", ids[0], ids[1]),
        ("create", f"[{ids[0]},{ids[2]}]", ids[0], ids[2]),
    ])
    assert rows[2:] == [
        ("delete", f"[{ids[0]},{ids[1]}]", ids[0], ids[1]),
        ("delete", f"[{ids[0]},{ids[2]}]", ids[0], ids[2]),
    ]
    # the server default is read back: the payload is the model's full row
    assert all(e.payload["added_on"] for e in events(engine, entity="fid_favorites"))


# -- (3) no event for a row the statement did not change ----------------------------------------


def test_deleting_a_row_another_transaction_deleted_writes_no_event(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    with factory(expire_on_commit=False) as s:  # the session keeps holding the rows
        tags = [Tag(name=n) for n in ("gone", "here", "gone too", "also here")]
        s.add_all(tags)
        s.commit()
        ids = [t.id for t in tags]
        with engine.begin() as conn:  # another transaction deletes two of them
            conn.execute(sa.delete(Tag).where(Tag.id.in_([ids[0], ids[2]])))
        s.delete(tags[0])  # one row: the DELETE's rowcount is 0
        with pytest.warns(sa.exc.SAWarning, match="0 were matched"):
            s.flush()
        s.delete(tags[1])
        s.delete(tags[2])  # two rows in one DELETE, one of them gone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # psycopg2 can't count it
            s.commit()
    deletes = [e.entity_id for e in events(engine, operation="delete")]
    assert deletes == [str(ids[1])]


def test_bulk_update_and_delete_matching_nothing_write_nothing(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        s.execute(sa.update(Tag).where(Tag.id == 404).values(name="x"))
        s.execute(sa.delete(Tag).where(Tag.id == 404))
        s.commit()
    assert events(engine) == []


# -- (4) values as the column type stores them --------------------------------------------------


def test_payload_values_are_what_the_column_stored(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    when = dt.datetime(2026, 12, 2, 19, 12, 35, 465896, tzinfo=dt.UTC)
    with factory() as s:
        person = Person(name="Ada", email="Ada@Example.COM", birthday=when, note=140,  # type: ignore[arg-type]
                        created_at=when)
        s.add(person)
        s.commit()
        person.birthday = when + dt.timedelta(days=1)  # type: ignore[assignment]
        person.note = 141  # type: ignore[assignment]
        s.commit()
        s.delete(person)  # still holds the datetime and the int it was given
        s.commit()
    create, update, delete = events(engine, entity="fid_people")
    assert create.payload["birthday"] == "2026-12-02"  # a date column given a datetime
    assert create.payload["note"] == "140"  # a string column given an int
    assert create.payload["email"] == "ada@example.com"  # process_bind_param applied
    assert create.payload["created_at"] == "2026-12-02T19:12:35.465896"  # naive UTC stays naive
    assert create.payload["status"] == "new"  # server default
    assert update.meta["changes"]["birthday"] == {"old": "2026-12-02", "new": "2026-12-03"}
    assert update.meta["changes"]["note"] == {"old": "140", "new": "141"}
    assert update.payload["version"] == 2
    assert (delete.payload["birthday"], delete.payload["note"]) == ("2026-12-03", "141")


def test_an_update_that_changes_only_what_the_database_sets_gets_its_event(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    """The session holds "0" as loaded from the database; ``note = 0`` compares unequal, so
    SQLAlchemy runs an UPDATE that stores "0" again: the version counter and ``updated_at``
    change, so the row did, and its event says so."""
    with factory() as s:
        [person] = _people(s, "ada")
        sa.orm.attributes.set_committed_value(person, "note", "0")  # as a query loads it
        person.note = 0  # type: ignore[assignment]
        s.commit()
    with engine.connect() as conn:
        version = conn.scalar(sa.select(Person.version))
    updates = events(engine, operation="update")
    assert version == 2  # the UPDATE ran
    assert [e.payload["version"] for e in updates] == [2]
    assert set(updates[-1].meta["changes"]) >= {"version", "updated_at"}


def test_composite_entity_id_follows_the_tables_primary_key(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        soup = Recipe(title="soup", steps=[Step(position=7, text="boil")])
        s.add(soup)
        s.commit()
        soup_id = soup.id
    [step] = events(engine, entity="fid_steps")
    assert step.entity_id == f"[7,{soup_id}]"  # PRIMARY KEY (position, recipe_id)


def test_single_and_joined_inheritance_and_versions(
    engine: sa.Engine, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        chef, gadget = Chef(name="c", stars=1), Gadget(name="g", power=2)
        s.add_all([chef, gadget])
        s.commit()
        chef.stars = 2
        gadget.name = "g2"
        s.commit()
        gadget_id = gadget.id
    by = {(e.entity, e.operation): e for e in events(engine)}
    assert by[("fid_people", "create")].payload["kind"] == "chef"
    assert by[("fid_people", "update")].meta["changes"]["version"] == {"old": 1, "new": 2}
    assert by[("fid_gadgets", "update")].payload == {
        "id": gadget_id, "name": "g2", "type": "gadget", "power": 2}


# -- (5) capture(engine) and uncaptured sessions ------------------------------------------------


class AppSession(Session):
    pass


def test_capture_engine_covers_every_session_on_it(engine: sa.Engine, tmp_path: Any) -> None:
    other = sa.create_engine(f"sqlite:///{tmp_path}/other.db")
    Base.metadata.create_all(other)
    outbox.create_schema(other)
    with outbox.capture(engine, models=Base) as handle:
        assert outbox.capture(engine, models=Base) is handle  # the same registration
        with pytest.raises(outbox.exceptions.CaptureError, match="already captured"):
            outbox.capture(engine, models=[Tag])
        with Session(engine) as s:
            s.add(Tag(name="plain"))
            s.commit()
        with AppSession(bind=engine) as s:
            s.add(Tag(name="subclass"))
            s.commit()
        with engine.connect() as conn, Session(bind=conn) as s:
            s.add(Tag(name="on a connection"))
            s.commit()
            conn.commit()
        with Session(other) as s:
            s.add(Tag(name="another engine"))
            s.commit()
    with Session(engine) as s:
        s.add(Tag(name="after remove"))
        s.commit()
    assert [e.payload["name"] for e in events(engine)] == [
        "plain", "subclass", "on a connection"]
    assert events(other) == []
    other.dispose()


def test_a_session_opened_in_a_hook_is_captured_by_capture_engine_and_warned_about_otherwise(
    engine: sa.Engine,
) -> None:
    inner_class = type("HookSession", (Session,), {})  # warned once per class and model

    def hook(mapper: Any, connection: sa.Connection, target: Recipe) -> None:
        with inner_class(bind=connection) as inner:  # as some applications' mapper hooks do
            inner.add(Tag(name=f"for {target.title}"))
            inner.flush()

    sa.event.listen(Recipe, "after_insert", hook)
    made = sessionmaker(engine)
    try:
        with outbox.capture(made, models=Base):
            with made() as s, pytest.warns(UncapturedSessionWarning, match="Tag"):
                s.add(Recipe(title="one"))
                s.commit()
            with made() as s, warnings.catch_warnings():
                warnings.simplefilter("error", UncapturedSessionWarning)  # once, not again
                s.add(Recipe(title="two"))
                s.commit()
        assert {e.entity for e in events(engine)} == {"fid_recipes"}
        with outbox.capture(engine, models=Base), made() as s:
            s.add(Recipe(title="three"))
            s.commit()
        assert [e.payload.get("name") or e.payload["title"] for e in events(engine)][-2:] == [
            "for three", "three"]
    finally:
        sa.event.remove(Recipe, "after_insert", hook)


# -- (7) psycopg2 ---------------------------------------------------------------------------------


def test_psycopg2_writes_a_flushs_events_with_one_json_array(pg_engine: sa.Engine) -> None:
    statements: list[str] = []

    def seen(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO EVENTS"):
            statements.append(statement)

    sa.event.listen(pg_engine, "before_cursor_execute", seen)
    made = sessionmaker(pg_engine)
    with outbox.capture(made, models=Base), made() as s:
        s.add_all([Tag(name=f"t{i}") for i in range(20)])
        s.commit()
    assert len(statements) == 1 and "jsonb_array_elements" in statements[0]
    assert [e.payload["name"] for e in events(pg_engine)] == [f"t{i}" for i in range(20)]

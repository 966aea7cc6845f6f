"""An independent oracle for capture: a PostgreSQL row trigger on every application table logs
``to_jsonb(NEW)``, ``to_jsonb(OLD)`` and the transaction id; a statement trigger on ``events``
marks where each flush's events were written. A randomised workload (hypothesis) drives the
model set of ``fidelity_models`` through the ORM — inheritance of both kinds, many-to-many rows,
a model used as ``secondary``, composite keys, ``onupdate`` and server defaults,
``TypeDecorator``s, cascades and orphans, a version counter, stale deletes, rollbacks — and then:

- every row change the trigger logged has exactly one event of the same transaction and flush,
  table (a joined-inheritance row's tables count as its model's), operation and key, whose
  payload equals the stored row (values compared as JSON, timestamps and numbers by value);
- every event has such a row.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.events import Event
from tests.integration.fidelity_models import (
    APP_TABLES,
    Base,
    Chef,
    Favorite,
    Gadget,
    Item,
    Person,
    Recipe,
    Step,
    Tag,
)

ORACLE_SQL = [
    "CREATE TABLE fid_oracle (n bigserial PRIMARY KEY, txid bigint, tbl text, op text, "
    "new jsonb, old jsonb, max_seq bigint)",
    """CREATE FUNCTION fid_log() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO fid_oracle (txid, tbl, op, new, old) VALUES (
        pg_current_xact_id()::text::bigint, TG_TABLE_NAME, lower(TG_OP),
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END);
      RETURN NULL;
    END $$""",
    """CREATE FUNCTION fid_flush() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO fid_oracle (txid, tbl, op, max_seq)
      VALUES (pg_current_xact_id()::text::bigint, 'events', 'flush',
              (SELECT max(seq) FROM events));
      RETURN NULL;
    END $$""",
    "CREATE TRIGGER fid_flush AFTER INSERT ON events FOR EACH STATEMENT "
    "EXECUTE FUNCTION fid_flush()",
    *[f"CREATE TRIGGER fid_log AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW "
      "EXECUTE FUNCTION fid_log()" for t in APP_TABLES],
]

#: joined inheritance: a gadget's rows in fid_items belong to its fid_gadgets events
JOINED = {"fid_items": "fid_gadgets"}
KEYS = {t.name: [c.name for c in t.primary_key.columns] for t in Base.metadata.sorted_tables}
KEYS["fid_gadgets"] = ["id"]


@pytest.fixture(params=["psycopg", "psycopg2"])
def oracle_engine(request: pytest.FixtureRequest, pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url.replace("+psycopg", "+" + request.param))
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        for statement in ORACLE_SQL:
            conn.exec_driver_sql(statement)
    yield engine
    engine.dispose()


# -- the workload -------------------------------------------------------------------------------

index = st.integers(0, 7)
step = st.one_of(
    st.tuples(st.just("people"), st.lists(st.sampled_from(["ada", "Bob", "cy"]), min_size=1,
                                          max_size=3), st.booleans()),
    st.tuples(st.just("rename_all"), st.sampled_from(["-2", "-x"])),
    st.tuples(st.just("birthday"), index, st.booleans()),
    st.tuples(st.just("note"), index, st.one_of(st.integers(0, 999), st.just("text"))),
    st.tuples(st.just("email"), index, st.sampled_from(["A@B.C", "x@y.z"])),
    st.tuples(st.just("recipe"), index, st.integers(0, 3), st.lists(index, max_size=2)),
    st.tuples(st.just("tag"), index, index),
    st.tuples(st.just("favorite"), index, index, st.booleans()),
    st.tuples(st.just("orphan"), index),
    st.tuples(st.just("retitle_all"), st.sampled_from(["!", "?"])),
    st.tuples(st.just("delete_recipe"), index),
    st.tuples(st.just("delete_person"), index),
    st.tuples(st.just("gadget"), index, st.integers(0, 2)),
    st.tuples(st.just("stale_tag"), index),
    st.tuples(st.just("flush")),
)
transaction = st.tuples(st.lists(step, min_size=1, max_size=8), st.sampled_from(
    ["commit", "commit", "commit", "rollback"]))


def _pick(objects: list[Any], i: int) -> Any:
    return objects[i % len(objects)] if objects else None


def _run_step(s: Session, engine: sa.Engine, op: tuple[Any, ...], outside: set[int]) -> None:
    kind = op[0]
    people = list(s.scalars(sa.select(Person).order_by(Person.id)))
    recipes = list(s.scalars(sa.select(Recipe).order_by(Recipe.id)))
    tags = list(s.scalars(sa.select(Tag).order_by(Tag.id)))
    if kind == "people":
        cls = Chef if op[2] else Person
        s.add_all([cls(name=n, email=f"{n}@Mail.Example") for n in op[1]])
    elif kind == "rename_all":
        names = [p.name for p in people]  # loaded first: one flush, one executemany UPDATE
        for person, name in zip(people, names, strict=True):
            person.name = name[:40] + op[1]
    elif kind == "birthday" and people:
        when = dt.datetime(2026, 12, 2, 19, 12, 35, tzinfo=dt.UTC)
        _pick(people, op[1]).birthday = when if op[2] else when.date()
    elif kind == "note" and people:
        _pick(people, op[1]).note = op[2]
    elif kind == "email" and people:
        _pick(people, op[1]).email = op[2]
    elif kind == "recipe":
        recipe = Recipe(title=f"r{len(recipes)}", author=_pick(people, op[1]),
                        steps=[Step(position=i + 1, text=f"s{i}") for i in range(op[2])])
        recipe.tags = [Tag(name=f"t{i}") for i in set(op[3])]
        s.add(recipe)
    elif kind == "tag" and recipes and tags:
        recipe, tag = _pick(recipes, op[1]), _pick(tags, op[2])
        if tag in recipe.tags:
            recipe.tags.remove(tag)
        else:
            recipe.tags.append(tag)
    elif kind == "favorite" and people and recipes:
        person, recipe = _pick(people, op[1]), _pick(recipes, op[2])
        row = s.get(Favorite, (person.id, recipe.id))
        if op[3]:  # through the relationship
            if recipe in person.favorites:
                person.favorites.remove(recipe)
            elif row is None:
                person.favorites.append(recipe)
        elif row is not None:
            if recipe not in person.favorites:
                s.delete(row)
        elif recipe not in person.favorites:
            s.add(Favorite(person_id=person.id, recipe_id=recipe.id))
    elif kind == "orphan" and recipes:
        recipe = _pick(recipes, op[1])
        if recipe.steps:
            recipe.steps.pop()
    elif kind == "retitle_all":
        for recipe in recipes:
            recipe.title = recipe.title[:40] + op[1]
    elif kind == "delete_recipe" and recipes:
        _delete_recipe(s, _pick(recipes, op[1]))
    elif kind == "delete_person" and people:
        person = _pick(people, op[1])
        person.favorites.clear()
        for recipe in list(person.recipes):
            _delete_recipe(s, recipe)
        s.delete(person)
    elif kind == "gadget":
        gadgets = list(s.scalars(sa.select(Gadget).order_by(Gadget.id)))
        gadget = _pick(gadgets, op[1])
        if op[2] == 0 or gadget is None:
            s.add_all([Gadget(name="g", power=op[1]), Item(name="plain")])
        elif op[2] == 1:
            gadget.power += 1
            gadget.name = gadget.name[:40] + "+"
        else:
            s.delete(gadget)
    elif kind == "stale_tag":
        s.flush()
        tag = Tag(name="stale")
        s.add(tag)
        s.flush()
        s.commit()  # the session keeps the tag; another transaction deletes it
        with engine.begin() as conn:
            outside.add(int(conn.exec_driver_sql(
                "SELECT pg_current_xact_id()::text::bigint").scalar_one()))
            conn.execute(sa.delete(Tag).where(Tag.id == tag.id))
        s.delete(tag)
    elif kind == "flush":
        s.flush()


def _delete_recipe(s: Session, recipe: Recipe) -> None:
    # Favourites of the recipe go first, through the ORM (the relationship is one-sided).
    for fav in s.scalars(sa.select(Favorite).where(Favorite.recipe_id == recipe.id)):
        s.delete(fav)
    s.flush()
    s.delete(recipe)


# -- the comparison -------------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return decimal.Decimal(str(value))
    if isinstance(value, str) and len(value) >= 10 and value[4] == "-":
        for parse in (dt.datetime.fromisoformat, dt.date.fromisoformat):
            try:
                return parse(value)
            except ValueError:
                continue
        try:
            return decimal.Decimal(value)
        except decimal.InvalidOperation:
            pass
    return value


def _key(table: str, row: dict[str, Any]) -> str:
    values = [row[c] for c in KEYS[table]]
    if len(values) == 1:
        return values[0] if isinstance(values[0], str) else json.dumps(values[0])
    return json.dumps(values, separators=(",", ":"))


def _oracle_changes(conn: sa.Connection, outside: set[int]) -> list[dict[str, Any]]:
    """The logged row changes, one per (transaction, flush, table, operation, key)."""
    rows = conn.exec_driver_sql(
        "SELECT txid, tbl, op, new, old, max_seq FROM fid_oracle ORDER BY n").all()
    changes: list[dict[str, Any]] = []
    pending: dict[tuple[Any, ...], dict[str, Any]] = {}
    for txid, tbl, op, new, old, max_seq in rows:
        if txid in outside:
            continue
        if op == "flush":
            for change in pending.values():
                change["max_seq"] = max_seq
            changes.extend(pending.values())
            pending = {}
            continue
        if op == "update" and new == old:
            continue
        row = new if op != "delete" else old
        logical = JOINED.get(tbl, tbl) if row.get("type") == "gadget" else tbl
        op_name = {"insert": "create", "update": "update", "delete": "delete"}[op]
        key = (txid, logical, op_name, _key(logical, row))
        change = pending.setdefault(key, {"txid": txid, "entity": logical, "operation": op_name,
                                          "entity_id": key[3], "values": {}})
        change["values"].update(row)
    for change in pending.values():
        change["max_seq"] = None  # a change after the last flush that wrote events
        changes.append(change)
    return changes


def _check(engine: sa.Engine, outside: set[int]) -> int:
    with engine.connect() as conn:
        changes = _oracle_changes(conn, outside)
        events = conn.execute(sa.select(
            Event.seq, Event.txid, Event.entity, Event.operation, Event.entity_id,
            Event.payload).order_by(Event.seq)).all()
    # each event belongs to the flush whose marker is the first with max_seq >= its seq
    markers = sorted({c["max_seq"] for c in changes if c["max_seq"] is not None})
    unmatched = {}
    for ev in events:
        flush = next((m for m in markers if m >= ev.seq), None)
        key = (ev.txid, flush, ev.entity, ev.operation, ev.entity_id)
        assert key not in unmatched, f"two events for one row change: {key}"
        unmatched[key] = ev.payload
    for change in changes:
        key = (change["txid"], change["max_seq"], change["entity"], change["operation"],
               change["entity_id"])
        payload = unmatched.pop(key, None)
        assert payload is not None, f"a row change without its event: {change}"
        stored = change["values"]
        if change["entity"] != "fid_gadgets" or change["operation"] != "update":
            assert set(payload) == set(stored), (key, payload, stored)
        # (a gadget's update may touch one of its two tables: those columns are compared)
        assert {k: _norm(payload.get(k)) for k in stored} == {
            k: _norm(v) for k, v in stored.items()}, (key, payload, stored)
    assert not unmatched, f"events without a row change: {unmatched}"
    return len(changes)


def test_every_row_change_has_exactly_one_event_with_the_stored_values(
    oracle_engine: sa.Engine,
) -> None:
    engine = oracle_engine
    made = sessionmaker(engine)
    checked: list[int] = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(transaction, min_size=1, max_size=6))
    def run(transactions: list[tuple[list[tuple[Any, ...]], str]]) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "TRUNCATE fid_oracle, events, " + ", ".join(APP_TABLES) + " RESTART IDENTITY")
        outside: set[int] = set()
        with outbox.capture(made, models=Base):
            for steps, end in transactions:
                with made() as s:
                    try:
                        for op in steps:
                            _run_step(s, engine, op, outside)
                        if end == "commit":
                            s.commit()
                        else:
                            s.rollback()
                    except sa.exc.SAWarning:
                        s.rollback()  # a stale delete of a row already gone: SQLAlchemy warns
        checked.append(_check(engine, outside))

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)  # stale deletes: expected here
        run()
    assert sum(checked) > 200  # the workload really changed rows

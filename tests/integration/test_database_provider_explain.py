"""``DatabaseProvider.list`` and the bus reads use indexes on 1,000,000 events (EXPLAIN plans).

The table is filled with one ``INSERT ... SELECT generate_series`` (secondary indexes built after
the load, as a restore would), with distributions like an application's: 95% captured row
changes over 40 tables, a few custom event types, 5,000 users, sessions of 20 events, processes
that each live for 20,000 events, 30 days of history, almost everything completed.

Assertions are on the plans PostgreSQL chooses, never on time. Queries are checked as the CLI
and dashboards run them (a page of 100) and, for selective filters, without a limit. ``events`` is
partitioned (docs/relay.md, "Storage"): the history (``events_done``, here 999,000 rows) must be
read through an index; the unfinished rows (``events_live``, the backlog: 1,000 rows here) may be
scanned.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox._sql import bus as dbsql
from outbox._sql import events as event_sql
from outbox._sql.ddl import PG_DONE_TABLE, PG_LIVE_TABLE, PG_SECONDARY_INDEXES
from outbox.events import Event
from outbox.providers.base import EventFilter, StartPosition
from tests.conftest import new_pg_database

pytestmark = pytest.mark.slow

ROWS = 1_000_000

GENERATE = """
INSERT INTO events (id, source, type, status, payload, user_id, session_id, instance_id,
    schema_name, entity, entity_id, operation, created_at, metadata, retry_count, next_attempt_at)
SELECT gen_random_uuid(),
  CASE WHEN mod(i, 100) < 95 THEN 'database' WHEN mod(i, 100) < 98 THEN 'system'
       WHEN mod(i, 100) < 99 THEN 'frontend' ELSE 'websocket' END,
  CASE WHEN mod(i, 100) < 95
       THEN 'public.table_' || mod(i, 40) || '.'
            || (ARRAY['create','update','delete'])[1 + mod(i, 3)]
       ELSE 'app.custom_' || mod(i, 10) || '.happened' END,
  CASE WHEN mod(i, 2000) = 0 THEN 'failed' WHEN mod(i, 2000) = 1 THEN 'pending'
       ELSE 'completed' END,
  jsonb_build_object('n', i),
  CASE WHEN mod(i, 5) = 0 THEN NULL ELSE 'u' || mod(i * 7, 5000) END,
  CASE WHEN mod(i, 3) = 0 THEN NULL ELSE 's' || (i / 20) END,
  'web-' || (i / 20000),
  CASE WHEN mod(i, 100) < 95 THEN 'public' END,
  CASE WHEN mod(i, 100) < 95 THEN 'table_' || mod(i, 40) END,
  CASE WHEN mod(i, 100) < 95 THEN mod(i, 50000)::text END,
  CASE WHEN mod(i, 100) < 95 THEN (ARRAY['create','update','delete'])[1 + mod(i, 3)] END,
  now() - interval '30 days' + (i * interval '2.592 seconds'),
  '{}'::jsonb, 0, now()
FROM generate_series(1, %(rows)s) AS i
"""


@pytest.fixture(scope="module")
def big() -> Iterator[sa.Engine]:
    with new_pg_database() as url:
        engine = sa.create_engine(url)
        outbox.create_schema(engine)
        with engine.begin() as conn:
            for name, _ddl in PG_SECONDARY_INDEXES:
                conn.exec_driver_sql(f'DROP INDEX "{name}"')
            conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            conn.exec_driver_sql(GENERATE, {"rows": ROWS})
            for _name, ddl in PG_SECONDARY_INDEXES:
                conn.exec_driver_sql(ddl)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE events")
        with engine.begin() as conn:
            dbsql.ensure_group(conn, "g", StartPosition.BEGINNING, None)
        yield engine
        engine.dispose()


def _scans(engine: sa.Engine, stmt: sa.Select[Any],
           params: dict[str, Any] | None = None) -> list[tuple[str, str | None, str | None]]:
    """(node type, index, relation) of every scan in the plan PostgreSQL picks for ``stmt``."""
    compiled = stmt.compile(dialect=engine.dialect)
    return _plan_scans(engine, str(compiled), {**compiled.params, **(params or {})})


def _plan_scans(engine: sa.Engine, sql: str,
                values: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", values).scalar()
    out: list[tuple[str, str | None, str | None]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Scan" in node["Node Type"]:
            out.append((node["Node Type"], node.get("Index Name"), node.get("Relation Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return out


NOW = dt.datetime.now(dt.UTC)

#: filter -> the index of the history it must be served by (page of 100, and without a limit
#: when selective); None: the filter reads the live partition only
SELECTIVE: list[tuple[EventFilter, str | None]] = [
    (EventFilter(type="public.table_3.update"), "ix_events_type_created_at"),
    (EventFilter(type="app.custom_3.*"), "ix_events_type_created_at"),
    (EventFilter(type="public.table_3.*"), "ix_events_type_created_at"),
    (EventFilter(status="failed"), None),
    (EventFilter(status="pending"), None),
    (EventFilter(user_id="u77"), "ix_events_user_id"),
    (EventFilter(session_id="s4242"), "ix_events_session_id"),
    (EventFilter(instance_id="web-37"), "ix_events_instance_id_created_at"),
    (EventFilter(entity="table_3", entity_id="123"), "ix_events_entity_entity_id"),
    (EventFilter(entity_id="123"), "ix_events_entity_entity_id"),
    (EventFilter(start_time=NOW - dt.timedelta(hours=1)), "ix_events_created_at"),
    (EventFilter(start_time=NOW - dt.timedelta(days=2), end_time=NOW - dt.timedelta(days=1)),
     "ix_events_created_at"),
]
#: low-cardinality fields: a page is found along the created_at index (the filter drops the rest)
BROAD = [
    EventFilter(source="frontend"),
    EventFilter(source="database"),
    EventFilter(schema_name="public"),
    EventFilter(operation="delete"),
    EventFilter(entity="table_3"),
    EventFilter(type="public.*.update"),
    EventFilter(type="app.>"),
    EventFilter(status="completed"),
    EventFilter(source="system", operation=None, start_time=NOW - dt.timedelta(days=3)),
]


def _ids(f: EventFilter) -> str:
    return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(f).items()
                    if v is not None and k not in ("offset",))[:60]


HISTORY_INDEXES = {name for name, ddl in PG_SECONDARY_INDEXES if f" ON {PG_DONE_TABLE} " in ddl}


def _history_scans(scans: list[tuple[str, str | None, str | None]]) -> list[Any]:
    """The scans of the history partition (a bitmap index scan names only its index)."""
    return [s for s in scans if s[2] == PG_DONE_TABLE or s[1] in HISTORY_INDEXES]


@pytest.mark.parametrize(("f", "index"), SELECTIVE, ids=[_ids(f) for f, _ in SELECTIVE])
@pytest.mark.parametrize("limit", [100, None])
def test_selective_filters_use_their_index(big: sa.Engine, f: EventFilter, index: str | None,
                                           limit: int | None) -> None:
    scans = _scans(big, event_sql.list_statement("postgresql", dataclasses.replace(f, limit=limit)))
    assert {s[2] for s in scans} - {None} <= {PG_LIVE_TABLE, PG_DONE_TABLE}, scans
    if index is None:  # a status of unfinished rows: the history is not read at all
        assert not _history_scans(scans), scans
        return
    assert not [s for s in _history_scans(scans) if s[0] == "Seq Scan"], scans
    assert index in {s[1] for s in scans}, scans


@pytest.mark.parametrize("f", BROAD, ids=[_ids(f) for f in BROAD])
def test_a_page_of_broad_filters_uses_an_index(big: sa.Engine, f: EventFilter) -> None:
    scans = _scans(big, event_sql.list_statement("postgresql", dataclasses.replace(f, limit=100)))
    assert _history_scans(scans), scans
    assert not [s for s in _history_scans(scans) if s[0] == "Seq Scan"], scans


def test_a_prefix_pattern_without_limit_uses_the_type_index(big: sa.Engine) -> None:
    scans = _scans(big, event_sql.list_statement("postgresql", EventFilter(type="app.>")))
    assert "ix_events_type_created_at" in {s[1] for s in scans}, scans
    assert not [s for s in _history_scans(scans) if s[0] == "Seq Scan"], scans


def test_every_filter_field_is_covered() -> None:
    fields = {f.name for f in dataclasses.fields(EventFilter)} - {"limit", "offset"}
    used = {k for flt, _ in SELECTIVE for k, v in dataclasses.asdict(flt).items()
            if v is not None} | {k for flt in BROAD for k, v in dataclasses.asdict(flt).items()
                                 if v is not None}
    assert fields - used == set()


def test_bus_reads_use_indexes(big: sa.Engine) -> None:
    with big.connect() as conn:
        snap = conn.execute(sa.select(dbsql.SNAPSHOT)).scalar_one()
        last = conn.execute(sa.select(sa.func.max(Event.__table__.c.txid))).scalar_one()
    assert last < dbsql.snapshot_xmax(snap)  # (the generator wrote every row in one transaction)
    seq_indexes = {"ix_events_bus_seq", "ix_events_live_seq"}
    # a group 5,000 events into a batch, with and without a pattern: along the seq indexes
    behind = {"cur": ROWS - 5000, "end": ROWS, "hi": snap, "lo": f"{last}:{last}:", "lim": 100}
    for pattern in ("*", "app.>"):
        scans = _scans(big, dbsql.batch_statement(pattern, True, False), behind)
        assert scans and all(s[1] in seq_indexes for s in scans), scans
    # a group at the very beginning reads the history in seq order from the index too
    scans = _scans(big, dbsql.batch_statement("*", False, False),
                   {"cur": 0, "end": ROWS, "hi": snap, "lim": 100})
    assert ("Index Scan", "ix_events_bus_seq", PG_DONE_TABLE) in scans, scans
    # opening a batch: index probes of the transactions committed since the last snapshot
    txid_indexes = {"ix_events_txid_seq", "ix_events_live_txid_seq"}
    scans = _scans(big, dbsql._open_statement(True),
                   {"lo_xmax": dbsql.snapshot_xmax(snap), "lo_xip": [int(last) + 5]})
    assert scans and all(s[1] in txid_indexes for s in scans if s[2]), scans
    # what a waiting consumer polls: index probes only
    with big.begin() as conn:
        conn.execute(sa.update(dbsql.groups).values(snapshot=snap, batch=None))
    scans = _scans(big, dbsql.peek_statement("postgresql"), {"grp": "g"})
    assert not [s for s in scans if s[0] == "Seq Scan" and s[2] in (PG_LIVE_TABLE, PG_DONE_TABLE)
                ], scans


#: docs/audit.md recipes over the history, with values of this table: each must read the history
#: (events_done, 999,000 rows) through an index.
AUDIT_RECIPES = {
    "user-actions": {"'42'": "'u42'", "2026-01-01T00:00:00Z": (NOW - dt.timedelta(days=10))
                     .isoformat(), "2026-02-01T00:00:00Z": NOW.isoformat()},
    "entity-history": {"'users'": "'table_3'", "'42'": "'123'"},
    "entity-as-of": {"'users'": "'table_3'", "'42'": "'123'",
                     "2026-01-31T00:00:00Z": NOW.isoformat()},
}


@pytest.mark.parametrize("name", sorted(AUDIT_RECIPES))
def test_the_audit_recipes_read_the_history_through_an_index(big: sa.Engine, name: str) -> None:
    from tests.integration.test_audit_docs import recipes

    sql = recipes()[name].strip().rstrip(";")
    for old, new in AUDIT_RECIPES[name].items():
        assert old in sql, (name, old)
        sql = sql.replace(old, new)
    scans = _plan_scans(big, sql.replace("%", "%%"), {})
    assert _history_scans(scans), scans
    assert not [s for s in _history_scans(scans) if s[0] == "Seq Scan"], scans

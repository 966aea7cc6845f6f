"""Every SQL block of docs/audit.md runs on PostgreSQL and returns what the text promises.

Blocks are found by their ``<!-- recipe: NAME -->`` marker; a ``sql`` block without a marker, a
marker without a check here, or a check without a block fails the suite, so the docs cannot rot.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox.events import Event, utcnow
from tests.conftest import new_pg_database
from tests.integration.ops_seed import add

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
_BLOCK = re.compile(r"(?:<!-- recipe: (?P<name>[\w-]+) -->\s*\n)?```sql\n(?P<sql>.*?)```", re.S)


def test_every_column_of_events_is_documented() -> None:
    """The column table of docs/capture.md names every column, no more."""
    text = (DOC.parent / "capture.md").read_text()
    section = text[text.index("## The events table"):text.index("## Who:")]
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", section, re.M)
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    columns = set(Event.__table__.c.keys())
    assert named == columns, (columns - named, named - columns)


def recipes() -> dict[str, str]:
    found: dict[str, str] = {}
    for m in _BLOCK.finditer(DOC.read_text()):
        assert m.group("name"), f"sql block without a recipe marker:\n{m.group('sql')}"
        assert m.group("name") not in found, f"duplicate recipe {m.group('name')}"
        found[m.group("name")] = m.group("sql")
    return found


def run(conn: sa.Connection, sql: str) -> list[dict[str, Any]]:
    """Run a recipe as psql would (statements separated by ';'); rows of the last one."""
    rows: list[dict[str, Any]] = []
    for statement in (s.strip() for s in sql.split(";")):
        if statement:
            # exec_driver_sql: the recipe text verbatim (psycopg needs '%' doubled).
            result = conn.exec_driver_sql(statement.replace("%", "%%"))
            rows = [dict(r._mapping) for r in result] if result.returns_rows else []
    return rows


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def ev(type_: str, created: dt.datetime, **kw: Any) -> Event:
    status = kw.pop("status", "completed")
    error, completed_at = kw.pop("error", None), kw.pop("completed_at", None)
    e = outbox.new_event("database", type_, kw.pop("payload", {}), created_at=created,
                         status=status, **kw)
    e.error = error
    if status in ("completed", "failed"):
        e.completed_at = completed_at or created + dt.timedelta(milliseconds=5)
    return e


# -- shared, read-only data set -----------------------------------------------------------------


class Data:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        now = utcnow()
        user = {"schema_name": "public", "entity": "users", "entity_id": "42"}
        self.create = ev("public.users.create", ts("2026-01-05T10:00:00"), user_id="42",
                         operation="create", payload={"id": 42, "name": "Ann"}, **user)
        self.update = ev("public.users.update", ts("2026-01-10T10:00:00"), user_id="42",
                         operation="update", payload={"id": 42, "name": "Anne", "email": "a@x"},
                         metadata={"changes": {"name": {"old": "Ann", "new": "Anne"},
                                               "email": {"old": None, "new": "a@x"}}}, **user)
        self.order = ev("public.orders.create", ts("2026-01-20T10:00:00"), user_id="42",
                        operation="create", schema_name="public", entity="orders",
                        entity_id="9")
        self.delete = ev("public.users.delete", ts("2026-02-03T10:00:00"), user_id="7",
                         operation="delete", payload={"id": 42, "name": "Anne"}, **user)
        others = [
            ev("public.users.update", ts("2026-01-15T10:00:00"), user_id="7",
               schema_name="public", entity="users", entity_id="43", operation="update"),
            ev("audit.users.update", ts("2026-01-16T10:00:00"), user_id="7",
               schema_name="audit", entity="users", entity_id="42", operation="update"),
        ]
        self.failed_recent = ev("public.a.create", now - dt.timedelta(minutes=20),
                                status="failed", error="boom", ordering_key="a:1",
                                completed_at=now - dt.timedelta(minutes=10))
        failed_old = ev("public.a.create", now - dt.timedelta(hours=3), status="failed",
                        completed_at=now - dt.timedelta(hours=2), error="old")
        self.behind = ev("public.a.update", now - dt.timedelta(minutes=15), status="pending",
                         ordering_key="a:1")
        self.retrying = ev("public.b.create", now - dt.timedelta(minutes=3), status="pending")
        self.retrying.retry_count, self.retrying.error = 2, "timeout"
        minute = now.replace(second=30, microsecond=0) - dt.timedelta(minutes=5)
        self.minute = minute.replace(second=0)
        bursts = [ev("public.t.create", minute) for _ in range(3)] + [
            ev("public.u.create", minute),
            ev("public.t.create", minute + dt.timedelta(minutes=2)),
        ]
        for i, b in enumerate(bursts[:3]):
            b.completed_at = b.created_at + dt.timedelta(seconds=i + 1)
        self.bursts = bursts
        add(engine, [self.create, self.update, self.order, self.delete, *others,
                     self.failed_recent, failed_old, self.behind, self.retrying, *bursts])


@pytest.fixture(scope="module")
def data() -> Iterator[Data]:
    with new_pg_database() as url:
        engine = sa.create_engine(url)
        outbox.create_schema(engine)
        yield Data(engine)
        engine.dispose()


def check_user_actions(rows: list[dict[str, Any]], d: Data) -> None:
    assert [r["type"] for r in rows] == ["public.users.create", "public.users.update",
                                         "public.orders.create"]
    assert rows[0]["payload"] == {"id": 42, "name": "Ann"}


def check_entity_history(rows: list[dict[str, Any]], d: Data) -> None:
    got = [(r["operation"], r["changed_column"], r["old_value"], r["new_value"]) for r in rows]
    assert got == [("create", None, None, None), ("update", "email", None, "a@x"),
                   ("update", "name", "Ann", "Anne"), ("delete", None, None, None)]
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)


def check_entity_as_of(rows: list[dict[str, Any]], d: Data) -> None:
    assert [(r["operation"], r["payload"]) for r in rows] == [
        ("update", {"id": 42, "name": "Anne", "email": "a@x"})]


def check_failures_last_hour(rows: list[dict[str, Any]], d: Data) -> None:
    assert [(r["id"], r["error"]) for r in rows] == [(d.failed_recent.id, "boom")]


def check_retrying(rows: list[dict[str, Any]], d: Data) -> None:
    assert [(r["id"], r["retry_count"], r["error"]) for r in rows] == [
        (d.retrying.id, 2, "timeout")]


def check_throughput_per_minute(rows: list[dict[str, Any]], d: Data) -> None:
    got = [(r["minute"], r["type"], r["events"]) for r in rows]
    m = d.minute
    expected = {(m, "public.t.create", 3), (m, "public.u.create", 1),
                (m + dt.timedelta(minutes=2), "public.t.create", 1)}
    assert expected <= set(got)
    assert got == sorted(got, key=lambda g: (g[0], g[1]))
    assert all(r["minute"] >= utcnow() - dt.timedelta(hours=1, minutes=1) for r in rows)


def check_delivery_latency(rows: list[dict[str, Any]], d: Data) -> None:
    t = next(r for r in rows if r["type"] == "public.t.create")
    assert t["events"] == 4
    assert 1.0 <= t["p50_seconds"] <= 3.0 and t["p99_seconds"] == pytest.approx(2.97, abs=0.05)


def check_lag(rows: list[dict[str, Any]], d: Data) -> None:
    (row,) = rows
    assert row["undelivered"] == 2
    assert 15 * 60 <= float(row["lag_seconds"]) < 3600


def check_blocked_keys(rows: list[dict[str, Any]], d: Data) -> None:
    assert [(r["ordering_key"], r["failed_event"], r["waiting"]) for r in rows] == [
        ("a:1", d.failed_recent.id, 1)]


READ_ONLY: dict[str, Callable[[list[dict[str, Any]], Data], None]] = {
    "user-actions": check_user_actions,
    "entity-history": check_entity_history,
    "entity-as-of": check_entity_as_of,
    "failures-last-hour": check_failures_last_hour,
    "retrying": check_retrying,
    "throughput-per-minute": check_throughput_per_minute,
    "delivery-latency": check_delivery_latency,
    "lag": check_lag,
    "blocked-keys": check_blocked_keys,
}
MAINTENANCE = ["autovacuum-settings", "autovacuum-check", "retention-batch", "archive-create",
               "archive-partition", "archive-move", "archive-query", "archive-drop"]


def test_every_block_is_checked() -> None:
    assert set(recipes()) == set(READ_ONLY) | set(MAINTENANCE)


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_audit_recipe(data: Data, name: str) -> None:
    with data.engine.connect() as conn:
        rows = run(conn, recipes()[name])
    READ_ONLY[name](rows, data)


def test_maintenance_recipes_in_order(pg_engine: sa.Engine) -> None:
    docs = recipes()
    now = utcnow()
    # failed, so that the retention recipe (completed only) leaves them to the archive steps
    jan = [ev("public.users.update", ts("2026-01-10T00:00:00"), entity="users",
              entity_id="42", status="failed") for _ in range(3)]
    feb_failed = ev("public.users.update", ts("2026-02-10T00:00:00"), status="failed",
                    entity="users", entity_id="42")
    jan_pending = ev("public.users.update", ts("2026-01-11T00:00:00"), status="pending",
                     entity="users", entity_id="42")
    old = [ev("t.old", now - dt.timedelta(days=40)) for _ in range(4)]
    young = ev("t.young", now - dt.timedelta(days=2))
    add(pg_engine, [*jan, feb_failed, jan_pending, *old, young])

    with pg_engine.begin() as conn:
        run(conn, docs["autovacuum-settings"])
        options = dict(conn.exec_driver_sql(
            "SELECT relname, reloptions FROM pg_class "
            "WHERE relname IN ('events_live', 'events_done')").all())
        assert "autovacuum_vacuum_threshold=5000" in options["events_live"]
        assert "autovacuum_vacuum_insert_threshold=100000" in options["events_done"]
        stats = run(conn, docs["autovacuum-check"])
        assert sorted(s["relname"] for s in stats) == ["events_done", "events_live"]
        assert all("n_dead_tup" in s for s in stats)

        run(conn, docs["retention-batch"])
        left = set(conn.execute(sa.select(Event.type)).scalars())
        assert "t.old" not in left and "t.young" in left

        run(conn, docs["archive-create"])
        run(conn, docs["archive-partition"])
        run(conn, docs["archive-move"])
        moved = conn.exec_driver_sql(
            "SELECT tableoid::regclass::text AS part, id FROM events_archive").all()
        assert sorted(p for p, _ in moved) == ["events_archive_2026_01"] * 3 + [
            "events_archive_2026_02"]
        remaining = set(conn.execute(sa.select(Event.id)).scalars())
        assert jan_pending.id in remaining and not remaining & {e.id for e in jan}

        history = run(conn, docs["archive-query"])
        assert [r["seq"] for r in history] == sorted(
            e.seq for e in [*jan, feb_failed, jan_pending])

        run(conn, docs["archive-drop"])
        parts = conn.exec_driver_sql(
            "SELECT tableoid::regclass::text FROM events_archive").scalars().all()
        assert parts == ["events_archive_2026_02"]

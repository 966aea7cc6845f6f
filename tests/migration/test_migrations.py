"""Alembic: the shipped revisions build the same schema as the mapping, on every dialect.

- ``alembic upgrade head`` / ``downgrade base`` from the repository root (OUTBOX_DATABASE_URL);
- the migrated database and one built by ``outbox.create_schema`` are identical (tables, columns,
  indexes with their WHERE clauses, constraints, triggers);
- autogenerate against ``outbox.Event.metadata`` finds nothing to do after ``upgrade head``.

An application's own Alembic environment: ``test_app_alembic.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

import outbox
from outbox._sql import ddl
from outbox._sql.ddl import PG_DONE_TABLE, PG_LIVE_TABLE
from outbox.events import OutboxBase
from outbox.migrations import VERSION_TABLE

ROOT = Path(__file__).resolve().parents[2]
OUTBOX_TABLES = {t.name for t in OutboxBase.metadata.sorted_tables}
#: PostgreSQL's partitions of events (docs/relay.md, "Storage").
PARTITIONS = {PG_LIVE_TABLE, PG_DONE_TABLE}


@pytest.fixture(params=["postgresql", "sqlite", "mariadb"])
def url(request: pytest.FixtureRequest) -> str:
    fixture = {"postgresql": "pg_url", "sqlite": "sqlite_url", "mariadb": "mariadb_url"}
    value: str = request.getfixturevalue(fixture[request.param])
    return value


def alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """``alembic ...`` run from the repository root, as the README shows."""
    env = {**os.environ, "OUTBOX_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def repo_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Everything about the outbox tables that a migration could get wrong."""
    insp = sa.inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(OUTBOX_TABLES | PARTITIONS):
        if not insp.has_table(table):
            continue
        columns = {
            c["name"]: (str(c["type"]).upper(), c["nullable"], _default(c.get("default")),
                        bool(c.get("autoincrement") is True), c.get("identity") is not None)
            for c in insp.get_columns(table)
        }
        indexes = {
            i["name"]: (tuple(i["column_names"]), bool(i["unique"]),
                        _where(i.get("dialect_options", {})))
            for i in insp.get_indexes(table)
        }
        uniques = {u["name"]: tuple(u["column_names"]) for u in insp.get_unique_constraints(table)}
        pk = insp.get_pk_constraint(table)
        out[table] = {"columns": columns, "indexes": indexes, "uniques": uniques,
                      "pk": (pk["name"], tuple(pk["constrained_columns"]))}
    out["triggers"] = _triggers(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            out["relations"] = conn.execute(sa.text(
                "SELECT relname, relkind, coalesce(reloptions, '{}'), "
                "coalesce(pg_get_expr(relpartbound, oid), ''), "
                "coalesce(pg_get_partkeydef(oid), '') FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'S') "
                "AND relname <> 'alembic_version' ORDER BY relname")).all()
            out["functions"] = conn.execute(sa.text(
                "SELECT proname, prosrc FROM pg_proc "
                "WHERE pronamespace = 'public'::regnamespace ORDER BY proname")).all()
    return out


def _default(value: Any) -> str | None:
    return None if value is None else str(value).strip("()'\"").lower()


def _where(options: dict[str, Any]) -> str | None:
    where = options.get("postgresql_where") or options.get("sqlite_where")
    return None if where is None else " ".join(str(where).split()).lower()


def _triggers(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.execute(sa.text(
                "SELECT tgname || ':' || pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE NOT tgisinternal ORDER BY tgname"))
        elif engine.dialect.name == "sqlite":
            rows = conn.execute(sa.text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"))
        else:
            rows = conn.execute(sa.text(
                "SELECT trigger_name FROM information_schema.triggers "
                "WHERE trigger_schema = database() ORDER BY trigger_name"))
        return [r[0] for r in rows]


def test_upgrade_head_and_downgrade_base_from_the_repository_root(url: str) -> None:
    up = alembic("upgrade", "head", url=url)
    assert up.returncode == 0, up.stderr
    engine = sa.create_engine(url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        assert tables >= OUTBOX_TABLES
        history = PG_DONE_TABLE if engine.dialect.name == "postgresql" else "events"
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes(history)}
        assert {"ix_events_type_created_at", "ix_events_entity_entity_id",
                "ix_events_user_id", "ix_events_created_at"} <= indexes
        # The migrated table works like the mapped one: seq numbering, NOTIFY trigger, capture.
        with sa.orm.Session(engine) as s:
            s.add_all([outbox.new_event("system", "t.a"), outbox.new_event("system", "t.b")])
            s.commit()
            seqs = s.scalars(sa.select(outbox.Event.seq).order_by(outbox.Event.seq)).all()
        assert seqs == [1, 2]

        down = alembic("downgrade", "base", url=url)
        assert down.returncode == 0, down.stderr
        # Alembic keeps its (now empty) version table, which is outbox_alembic_version here.
        tables = set(sa.inspect(engine).get_table_names())
        assert not ((OUTBOX_TABLES | PARTITIONS) - {VERSION_TABLE}) & tables
        assert _triggers(engine) == []
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                assert conn.scalar(sa.text(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'outbox_notify'")) == 0
    finally:
        engine.dispose()


@contextlib.contextmanager
def second_database(url: str, tmp_path: Path) -> Iterator[str]:
    """Another empty database on the same server as ``url``."""
    dialect = sa.make_url(url).get_backend_name()
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path}/second.db"
    elif dialect == "postgresql":
        from tests.conftest import new_pg_database

        with new_pg_database() as other:
            yield other
    else:
        name = f"{sa.make_url(url).database}_2"
        admin = sa.create_engine(url, poolclass=sa.NullPool)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
        try:
            yield str(sa.make_url(url).set(database=name))
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            admin.dispose()


def test_migration_and_create_schema_build_the_same_schema(url: str, tmp_path: Path) -> None:
    command.upgrade(repo_config(url), "head")
    with second_database(url, tmp_path) as other_url:
        migrated = sa.create_engine(url)
        mapped = sa.create_engine(other_url)
        try:
            outbox.create_schema(mapped)
            a, b = snapshot(migrated), snapshot(mapped)
        finally:
            mapped.dispose()
            migrated.dispose()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


def test_autogenerate_sees_no_difference_after_upgrade(url: str) -> None:
    command.upgrade(repo_config(url), "head")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "include_object": outbox.migrations.include_object})
            diff = compare_metadata(ctx, outbox.Event.metadata)
        assert diff == []
    finally:
        engine.dispose()


def _rows(engine: sa.Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every outbox table, as column -> value, in a stable order."""
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in OutboxBase.metadata.sorted_tables:
            if table.name in (VERSION_TABLE, "outbox_consumers", "outbox_consumer_claims"):
                continue  # the revision itself changes; bus positions are converted
            key = [c for c in table.primary_key.columns]
            rows = conn.execute(sa.select(table).order_by(*key)).mappings().all()
            out[table.name] = [dict(r) for r in rows]
    return out


def test_upgrade_and_downgrade_keep_every_row_of_a_populated_database(url: str) -> None:
    """An installation at outbox_0001 with events in every status (and leases, retries, errors,
    bus positions, inbox rows) upgrades to head and back without a row lost or changed, and
    ``seq`` numbering continues after the highest value it handed out."""
    import datetime as dt
    import uuid

    from outbox._sql import bus as dbsql
    from outbox.relay import RelayStore

    cfg = repo_config(url)
    command.upgrade(cfg, "outbox_0001")
    engine = sa.create_engine(url)
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    try:
        with sa.orm.Session(engine) as s:
            for i in range(40):
                status = ("pending", "processing", "completed", "failed")[i % 4]
                e = outbox.new_event(
                    "database", f"public.t{i % 3}.update", {"i": i, "name": f"row {i}"},
                    user_id=str(i % 5), session_id=None if i % 2 else f"s{i}",
                    schema_name="public", entity=f"t{i % 3}", entity_id=str(i),
                    operation="update", metadata={"changes": {"name": {"old": i, "new": i + 1}}},
                    ordering_key=f"public.t{i % 3}:{i % 7}", created_at=now, status=status)
                if status != "pending":
                    e.processed_at = now
                if status in ("completed", "failed"):
                    e.completed_at = now
                    e.lease_owner = "relay-1"
                if status == "processing":
                    e.lease_owner, e.lease_token = "relay-2", uuid.uuid4()
                    e.lease_expires_at = now + dt.timedelta(seconds=30)
                if status == "failed":
                    e.retry_count, e.error = 3, "boom"
                s.add(e)
            s.commit()
            with engine.begin() as conn:  # a rolled-back insert leaves a gap in seq
                conn.execute(sa.insert(outbox.Event.__table__).values(
                    id=uuid.uuid4(), source="system", type="t.gap", status="pending",
                    payload={}, instance_id="x", created_at=now, metadata={}, retry_count=0,
                    next_attempt_at=now))
                conn.rollback()
        with engine.begin() as conn:  # a group at the beginning, as outbox_0001 wrote it
            conn.execute(sa.text(
                "INSERT INTO outbox_consumers (group_name, created_at, updated_at) "
                "VALUES ('billing', :now, :now)"), {"now": now})
            conn.execute(sa.insert(outbox.schema.inbox_table).values(
                group_name="billing", event_id=uuid.uuid4(), handled_at=now))
        before = _rows(engine)
        with engine.connect() as conn:
            top = conn.scalar(sa.select(sa.func.max(outbox.Event.seq)))
        assert len(before["events"]) == 40

        command.upgrade(cfg, "head")
        assert _rows(engine) == before
        with engine.begin() as conn:  # the group still starts at the beginning
            (group,) = dbsql.list_groups(conn)
            found, _ = dbsql.read_next(conn, group.cursor, 1000, "*")
        assert [e.id for _pos, e in found] == [r["id"] for r in sorted(
            before["events"], key=lambda r: r["seq"])]
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                where = dict(conn.execute(sa.text(
                    "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1")).all())
            assert where == {PG_LIVE_TABLE: 30, PG_DONE_TABLE: 10}
        with sa.orm.Session(engine) as s:
            s.add(outbox.new_event("system", "t.after"))
            s.commit()
            after_seq = s.scalar(sa.select(outbox.Event.seq).where(outbox.Event.type == "t.after"))
        gap = 0 if engine.dialect.name == "sqlite" else 1  # SQLite numbers max(seq) + 1
        assert after_seq is not None and top is not None and after_seq > top + gap
        # The relay works on the upgraded table: the first pending head of each key is claimed.
        store = RelayStore(engine, owner="after-upgrade")
        store.sync_clock()
        claim = store.claim(100, lease=30)
        assert claim.events and all(e.status == "processing" for e in claim.events)
        store.finish(claim.token, [])

        command.downgrade(cfg, "outbox_0001")
        rows = _rows(engine)
        claimed = {e.id for e in claim.events}
        assert [r for r in rows["events"] if r["type"] != "t.after" and r["id"] not in claimed
                ] == [r for r in before["events"] if r["id"] not in claimed]
        with sa.orm.Session(engine) as s:
            s.add(outbox.new_event("system", "t.down"))
            s.commit()
            down_seq = s.scalar(sa.select(outbox.Event.seq).where(outbox.Event.type == "t.down"))
        assert down_seq is not None and down_seq > after_seq
    finally:
        engine.dispose()


@pytest.mark.anyio
async def test_a_relay_on_a_database_at_0001_says_to_upgrade(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's SQL works on the single table too, but the relay says it is not partitioned."""
    from outbox.relay import Relay

    cfg = repo_config(pg_url)
    command.upgrade(cfg, "outbox_0001")
    caplog.set_level("WARNING", logger="outbox.relay")
    relay = Relay(pg_url, provider=None, broker=outbox.Broker(outbox.MemoryProvider()))
    await relay.start()
    relay.engine.dispose()
    assert any("outbox_0001" in r.getMessage() for r in caplog.records)

    caplog.clear()
    command.upgrade(cfg, "head")
    relay = Relay(pg_url, provider=None, broker=outbox.Broker(outbox.MemoryProvider()))
    await relay.start()
    relay.engine.dispose()
    assert not [r for r in caplog.records if "outbox_0001" in r.getMessage()]


def test_the_layout_warning_without_a_recorded_revision(pg_url: str) -> None:
    """A schema made at outbox_0001 by hand (no revision recorded): the relay still tells from
    the table itself that it is not partitioned."""
    cfg = repo_config(pg_url)
    command.upgrade(cfg, "outbox_0001")
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM {VERSION_TABLE}")  # noqa: S608 (a constant)
        with engine.connect() as conn:
            assert ddl.storage_outdated(conn)
        command.stamp(cfg, "outbox_0001")
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            assert not ddl.storage_outdated(conn)
    finally:
        engine.dispose()

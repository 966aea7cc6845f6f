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
from outbox.events import OutboxBase
from outbox.migrations import VERSION_TABLE

ROOT = Path(__file__).resolve().parents[2]
OUTBOX_TABLES = {t.name for t in OutboxBase.metadata.sorted_tables}


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
    for table in sorted(OUTBOX_TABLES):
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
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes("events")}
        assert {"ix_events_pending", "ix_events_type_created_at", "ix_events_entity_entity_id",
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
        assert not OUTBOX_TABLES - {VERSION_TABLE} & set(sa.inspect(engine).get_table_names())
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
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, outbox.Event.metadata)
        assert diff == []
    finally:
        engine.dispose()

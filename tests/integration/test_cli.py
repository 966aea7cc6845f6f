"""`python -m outbox` commands, in process, on PostgreSQL and SQLite (main() with captured out)."""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox import cli
from outbox.events import utcnow
from tests.integration.ops_seed import INJECTIONS, add, count, event, statuses

DAY = dt.timedelta(days=1)


def run(url: str, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(["--database-url", url, *args], out=out)
    return code, out.getvalue()


def run_json(url: str, *args: str) -> Any:
    code, text = run(url, *args, "--json")
    assert code == 0, text
    return json.loads(text)


@pytest.fixture
def url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_events_list_filters_and_json(engine: sa.Engine, url: str) -> None:
    a = add(engine, [event("public.users.create", user_id="u1", entity="users", entity_id="1",
                           schema_name="public", operation="create", session_id="s1",
                           instance_id="i1", age=dt.timedelta(minutes=30),
                           payload={"name": "Ann"})])[0]
    add(engine, [event("public.users.update", user_id="u2", entity="users", entity_id="2",
                       age=2 * DAY),
                 event("public.orders.create", status="failed", source="system")])
    docs = run_json(url, "events", "list")
    assert len(docs) == 3 and docs[1]["id"] == str(a.id)  # oldest first, by created_at
    assert [d["type"] for d in docs] == ["public.users.update", "public.users.create",
                                         "public.orders.create"]
    by_id = run_json(url, "events", "list", "--user-id", "u1", "--session-id", "s1",
                     "--instance-id", "i1", "--schema-name", "public", "--entity", "users",
                     "--entity-id", "1", "--operation", "create", "--source", "database",
                     "--status", "pending", "--type", "public.users.*", "--since", "1h",
                     "--until", "2030-01-01")
    assert [d["id"] for d in by_id] == [str(a.id)]
    assert by_id[0]["payload"] == {"name": "Ann"} and by_id[0]["metadata"] == {}
    assert by_id[0]["created_at"] == a.created_at.isoformat()
    assert [d["type"] for d in run_json(url, "events", "list", "--type", "public.>",
                                        "--status", "failed")] == ["public.orders.create"]
    assert len(run_json(url, "events", "list", "--since", "1d")) == 2
    page = run_json(url, "events", "list", "--limit", "1", "--offset", "1")
    assert [d["type"] for d in page] == ["public.users.create"]
    code, text = run(url, "events", "list", "--limit", "2")
    assert code == 0
    header, *rows, footer = text.splitlines()
    assert header.split()[:4] == ["SEQ", "CREATED", "(UTC)", "STATUS"]
    assert len(rows) == 2 and "limit reached" in footer


def test_events_list_options_after_the_command(engine: sa.Engine, url: str) -> None:
    add(engine, [event("a.b")])
    out = io.StringIO()
    assert cli.main(["events", "list", "--json", "--database-url", url], out=out) == 0
    assert len(json.loads(out.getvalue())) == 1


def test_events_show(engine: sa.Engine, url: str) -> None:
    ev = add(engine, [event("public.users.update", payload={"x": [1, {"y": None}]},
                            metadata={"changes": {"x": {"old": 1, "new": 2}}})])[0]
    code, text = run(url, "events", "show", str(ev.id))
    assert code == 0 and text.startswith("{\n  ")  # pretty
    doc = json.loads(text)
    assert doc["id"] == str(ev.id) and doc["seq"] == ev.seq
    assert doc["payload"] == {"x": [1, {"y": None}]}
    assert doc["metadata"]["changes"]["x"] == {"old": 1, "new": 2}
    assert run(url, "events", "show", str(uuid.uuid4()))[0] == 1


def test_replay_by_id_and_by_filter(engine: sa.Engine, url: str) -> None:
    f1, f2, f3 = add(engine, [event("public.users.update", status="failed") for _ in range(3)])
    old = add(engine, [event("public.users.update", status="failed", age=2 * DAY)])[0]
    other = add(engine, [event("public.orders.update", status="failed")])[0]
    done = add(engine, [event("public.users.update", status="completed")])[0]

    assert run_json(url, "replay", str(f1.id), "--dry-run")["replayed"] == 1
    assert statuses(engine)[f1.id] == "failed"
    code, text = run(url, "replay", str(f1.id))
    assert (code, text) == (0, "replayed 1 event(s)\n")
    # one not failed, one unknown: the failed one is replayed, exit 1 tells about the rest
    missing = uuid.uuid4()
    code, text = run(url, "replay", str(f2.id), str(done.id), str(missing))
    assert code == 1
    assert "replayed 1" in text and f"not found: {missing}" in text
    assert "status completed" in text

    assert run_json(url, "replay", "--status", "failed", "--type", "public.users.*",
                    "--since", "1h", "--dry-run")["replayed"] == 1  # f3
    report = run_json(url, "replay", "--status", "failed", "--type", "public.users.*",
                      "--batch", "1")
    assert report == {"replayed": 2, "dry_run": False, "missing": [], "not_failed": {}}
    st = statuses(engine)
    assert [st[e.id] for e in (f1, f2, f3, old, other, done)] == [
        "pending", "pending", "pending", "pending", "failed", "completed"]


@pytest.mark.parametrize("args", [
    [],  # neither ids nor --status
    [str(uuid.uuid4()), "--status", "failed"],
    [str(uuid.uuid4()), "--type", "a.b"],
    ["--status", "completed"],
    ["not-a-uuid"],
    ["--status", "failed", "--type", "bad..pattern"],
    ["--status", "failed", "--since", "yesterday-ish"],
])
def test_replay_usage_errors(url: str, args: list[str],
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        code, _ = run(url, "replay", *args)
        raise SystemExit(code)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_stats(engine: sa.Engine, url: str) -> None:
    add(engine, [event("a.b.create", age=dt.timedelta(minutes=3)),
                 event("a.b.create", status="completed"),
                 event("a.c.update", status="failed", ordering_key="c:1", age=2 * DAY)])
    doc = run_json(url, "stats")
    assert doc["total"] == 3
    assert doc["by_status"] == {"pending": 1, "completed": 1, "failed": 1}
    assert doc["by_type"] == {"a.b.create": {"pending": 1, "completed": 1},
                              "a.c.update": {"failed": 1}}
    assert doc["backlog"] == {"pending": 1, "processing": 0, "failed": 1, "blocked_keys": 1}
    assert doc["lag_seconds"] >= 180
    assert run_json(url, "stats", "--since", "1d")["total"] == 2
    code, text = run(url, "stats")
    assert code == 0 and "lag: " in text and "a.c.update" in text and "1 blocked" in text


def test_cleanup(engine: sa.Engine, url: str) -> None:
    old = add(engine, [event("t.x", status="completed", age=40 * DAY) for _ in range(7)]
              + [event("t.x", status="failed", age=40 * DAY)])
    keep = add(engine, [event("t.x", status="pending", age=40 * DAY),
                        event("t.x", status="completed", age=DAY)])
    dry = run_json(url, "cleanup", "--older-than", "30d", "--dry-run")
    assert dry["deleted"] == 8 and dry["dry_run"] and count(engine) == 10
    doc = run_json(url, "cleanup", "--older-than", "30d", "--status", "completed",
                   "--batch", "3")
    assert doc["deleted"] == 7 and doc["batches"] == 3 and doc["by_status"] == {"completed": 7}
    code, text = run(url, "cleanup", "--older-than", "4w")
    assert code == 0 and text.startswith("deleted 1 event(s) (completed: 0, failed: 1)")
    assert set(statuses(engine)) == {e.id for e in keep}
    assert not set(statuses(engine)) & {e.id for e in old}


@pytest.mark.parametrize("args", [
    ["cleanup"],
    ["cleanup", "--older-than", "soon"],
    ["cleanup", "--older-than", "30d", "--status", "pending"],
    ["cleanup", "--older-than", "30d", "--status", "completed,processing"],
    ["cleanup", "--older-than", "30d", "--batch", "0"],
    ["cleanup", "--older-than", "30d", "--pause", "-1"],
    ["cleanup", "--older-than", "30d", "--pause", "nan"],
    ["events", "show", "12345"],
    ["events", "list", "--status", "done"],
    ["events", "list", "--limit", "-1"],
    ["events"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(url: str, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", url, *args], out=io.StringIO())
    assert info.value.code == 2


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_strings_in_every_filter(engine: sa.Engine, url: str, value: str) -> None:
    add(engine, [event("public.users.create", status="failed", user_id="u", entity="users",
                       entity_id="1", session_id="s", instance_id="i", schema_name="public",
                       operation="create")])
    for flag in ("--user-id", "--session-id", "--instance-id", "--schema-name", "--entity",
                 "--entity-id"):
        assert run_json(url, "events", "list", flag, value) == []
        assert run_json(url, "replay", "--status", "failed", flag, value)["replayed"] == 0
    # a type pattern made of allowed characters ('_', '%'?) is a literal type that matches
    # nothing; anything else is refused like time, status and source values (exit 2)
    try:
        outbox.EventFilter(type=value)
    except ValueError:
        pass
    else:
        assert run_json(url, "events", "list", "--type", value) == []
    for flag in ("--since", "--until", "--status", "--source", "--operation"):
        with pytest.raises(SystemExit) as info:
            cli.main(["--database-url", url, "events", "list", flag, value], out=io.StringIO())
        assert info.value.code == 2
    if value.strip("_-"):  # not a valid pattern segment
        with pytest.raises(SystemExit) as info:
            cli.main(["--database-url", url, "events", "list", "--type", value],
                     out=io.StringIO())
        assert info.value.code == 2
    assert count(engine) == 1 and set(statuses(engine).values()) == {"failed"}


def test_missing_schema_and_unreachable_database(tmp_path: Any, pg_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(f"sqlite:///{tmp_path}/empty.db", "stats")
    err = capsys.readouterr().err
    assert code == 1 and "alembic upgrade head" in err
    code, _ = run(pg_url, "stats")  # exists, no schema
    assert code == 1 and "alembic upgrade head" in capsys.readouterr().err
    code, _ = run("postgresql+psycopg://u:hunter2@127.0.0.1:1/x", "stats")
    err = capsys.readouterr().err
    assert code == 1 and "cannot connect" in err and "hunter2" not in err
    code, _ = run("not a url", "stats")
    assert code == 2


def test_database_url_resolution(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                 url: str) -> None:
    import argparse

    ns = argparse.Namespace(database_url=None, config=None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.Failure, match="no database"):
        cli.resolve_database_url(ns, env={})
    assert cli.resolve_database_url(ns, env={"OUTBOX_DATABASE_URL": url}) == url
    (tmp_path / "outbox.db").touch()
    assert cli.resolve_database_url(ns, env={}) == "sqlite:///outbox.db"
    ns.database_url = "sqlite:///other.db"
    assert cli.resolve_database_url(ns, env={"OUTBOX_DATABASE_URL": url}) == "sqlite:///other.db"


def test_durations_and_times() -> None:
    assert cli.parse_duration("30d") == dt.timedelta(days=30)
    assert cli.parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert cli.parse_duration("2w") == dt.timedelta(weeks=2)
    assert cli.parse_duration("500ms") == dt.timedelta(milliseconds=500)
    for bad in ("", "30", "d", "1x", "1h junk", "-1h"):
        with pytest.raises(ValueError):
            cli.parse_duration(bad)
    now = utcnow()
    assert cli.parse_time("1h", now) == now - dt.timedelta(hours=1)
    assert cli.parse_time("2026-01-31") == dt.datetime(2026, 1, 31, tzinfo=dt.UTC)
    assert cli.parse_time("2026-01-31T12:00:00Z") == dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)
    assert cli.parse_time("2026-01-31T12:00:00+02:00").utcoffset() == dt.timedelta(hours=2)


def test_database_url_from_config_file(engine: sa.Engine, url: str, tmp_path: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    add(engine, [event("a.b")])
    config = tmp_path / "outbox.yaml"
    config.write_text("event_broker:\n  database:\n    url: ${APP_DB}\n")
    monkeypatch.setenv("APP_DB", url)
    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)
    out = io.StringIO()
    assert cli.main(["--config", str(config), "stats", "--json"], out=out) == 0
    assert json.loads(out.getvalue())["total"] == 1
    monkeypatch.setenv("OUTBOX_CONFIG", str(config))
    out = io.StringIO()
    assert cli.main(["events", "list", "--json"], out=out) == 0
    assert len(json.loads(out.getvalue())) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("event_broker:\n  database:\n    url: 42\n    colour: blue\n")
    # a bad configuration is bad usage (exit 2), as in the sidecars
    assert cli.main(["--config", str(bad), "stats"], out=io.StringIO()) == 2
    assert cli.main(["--config", str(tmp_path / "missing.yaml"), "stats"],
                    out=io.StringIO()) == 2


def test_commands_on_mariadb(mariadb_url: str) -> None:
    """MariaDB is a further target: its own cleanup path (no LIMIT in an IN subquery)."""
    engine = sa.create_engine(mariadb_url)
    outbox.create_schema(engine)
    try:
        failed = add(engine, [event("public.users.create", status="failed") for _ in range(3)])
        add(engine, [event("t.x", status="completed", age=40 * DAY) for _ in range(7)])
        assert len(run_json(mariadb_url, "events", "list", "--type", "public.users.*")) == 3
        assert run_json(mariadb_url, "replay", "--status", "failed")["replayed"] == 3
        doc = run_json(mariadb_url, "cleanup", "--older-than", "30d", "--batch", "3")
        assert (doc["deleted"], doc["batches"]) == (7, 4)
        stats = run_json(mariadb_url, "stats")
        assert stats["by_status"] == {"pending": 3} and stats["backlog"]["pending"] == 3
        assert set(statuses(engine)) == {e.id for e in failed}
    finally:
        engine.dispose()

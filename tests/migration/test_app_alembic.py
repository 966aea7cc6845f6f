"""The documented Alembic recipe, end to end, in an application that has its own chain.

The application keeps one chain (one head): a revision of its own calls
``outbox.migrations.upgrade("outbox_0001")`` / ``downgrade("base")``, its ``env.py`` adds
``outbox.Event.metadata`` to ``target_metadata``. Every step runs the real ``alembic`` command:
``upgrade head``, ``check``, ``revision --autogenerate`` (empty), ``downgrade -1`` (removes only
the outbox tables) — and again after "a later outbox version" ships one more revision (a copy of
the package's versions directory plus a test revision), which the application picks up with one
more revision of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import outbox
import outbox.migrations
from outbox._sql.ddl import PG_DONE_TABLE, PG_LIVE_TABLE
from outbox.migrations import VERSION_TABLE, MigrationError
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = {PG_LIVE_TABLE, PG_DONE_TABLE}
OUTBOX_TABLES = {"events", "outbox_consumers", "outbox_consumer_claims", "outbox_dead_letters",
                 "outbox_inbox", VERSION_TABLE}

APP_ENV = '''
import os
from pathlib import Path

import sqlalchemy as sa
from alembic import context
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outbox
import outbox.migrations

if os.environ.get("TEST_OUTBOX_VERSIONS"):  # the test's "later outbox version"
    outbox.migrations.VERSIONS = Path(os.environ["TEST_OUTBOX_VERSIONS"])


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    email: Mapped[str | None] = mapped_column(sa.String(200))


target_metadata = [Base.metadata, outbox.Event.metadata]
engine = sa.create_engine(os.environ["APP_DATABASE_URL"], poolclass=sa.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True, include_object=outbox.migrations.include_object)
    with context.begin_transaction():
        context.run_migrations()
'''

REVISION = '''"""{message}"""
import sqlalchemy as sa
from alembic import op
{imports}
revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
{upgrade}


def downgrade():
{downgrade}
'''

APP_0001 = ("app_0001", None, "customers", "", """
    op.create_table("customers", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(100), nullable=False))""", """
    op.drop_table("customers")""")
APP_0002 = ("app_0002", "app_0001", "customers.email", "", """
    op.add_column("customers", sa.Column("email", sa.String(200), nullable=True))""", """
    op.drop_column("customers", "email")""")
# The recipe (docs/alembic.md): one revision of the application's own chain, bringing the outbox
# schema to the newest revision the package ships (outbox_0001 when the recipe was written).
HEAD = outbox.migrations.head()
APP_0003 = ("app_0003", "app_0002", "outbox", "import outbox.migrations\n", f"""
    outbox.migrations.upgrade("{HEAD}")""", """
    outbox.migrations.downgrade("base")""")

# What "a later outbox release" ships: one more revision after the package's head. A data change
# (autogenerate does not see it), so the test can tell it ran and was undone.
EXTRA = "outbox_9001"
EXTRA_REVISION = '''"""test: a later outbox revision."""
from alembic import op

revision = "outbox_9001"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    op.execute("INSERT INTO outbox_dead_letters (group_name, event_id, error, attempt, parked_at) "
               "VALUES ('migration-test', '00000000-0000-7000-8000-000000000001', 'x', 1, "
               "CURRENT_TIMESTAMP)")


def downgrade():
    op.execute("DELETE FROM outbox_dead_letters WHERE group_name = 'migration-test'")
'''
APP_0004 = ("app_0004", "app_0003", "outbox 9001", "import outbox.migrations\n", """
    outbox.migrations.upgrade("outbox_9001")""", f"""
    outbox.migrations.downgrade("{HEAD}")""")


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue("pg_url" if request.param == "postgresql"
                                         else "sqlite_url")
    return value


class App:
    """An application directory with its own alembic.ini, env.py and revisions."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        self.versions = path / "migrations" / "versions"
        self.versions.mkdir(parents=True)
        (path / "alembic.ini").write_text(textwrap.dedent("""
            [alembic]
            script_location = %(here)s/migrations
            path_separator = os
        """))
        (path / "migrations" / "env.py").write_text(APP_ENV)
        (path / "migrations" / "script.py.mako").write_text(
            (ROOT / "migrations" / "script.py.mako").read_text())
        self.env = {"APP_DATABASE_URL": url}

    def add(self, rev: tuple[str, str | None, str, str, str, str]) -> None:
        name, down, message, imports, up, downgrade = rev
        (self.versions / f"{name}.py").write_text(REVISION.format(
            message=message, imports=imports, rev=name, down=down, upgrade=up.strip("\n"),
            downgrade=downgrade.strip("\n")))

    def alembic(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=self.path,
                              env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"alembic {' '.join(args)}:\n{out}"
        return out

    def tables(self) -> set[str]:
        """The database's tables; PostgreSQL's partitions of events count as events."""
        engine = sa.create_engine(self.url, poolclass=sa.NullPool)
        try:
            names = set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
        if names >= PARTITIONS:
            assert "events" in names
            names -= PARTITIONS
        assert not PARTITIONS & names, names  # never one without the other, nor without events
        return names

    def scalar(self, sql: str) -> object:
        engine = sa.create_engine(self.url, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                return conn.scalar(sa.text(sql))
        finally:
            engine.dispose()

    def outbox_version(self) -> object:
        return self.scalar("SELECT version_num FROM outbox_alembic_version")

    def check_no_changes(self) -> None:
        assert "No new upgrade operations detected" in self.alembic("check")
        out = self.alembic("revision", "--autogenerate", "-m", "probe")
        probe = next(self.versions.glob("*_probe.py"))
        text = probe.read_text()
        probe.unlink()
        body = text.split('"""Upgrade schema."""', 1)[1].split("def downgrade", 1)[0]
        code = [line.strip() for line in body.splitlines() if line.strip()
                and not line.strip().startswith("#")]
        assert code == ["pass"], out + text


def test_the_recipe_in_an_application_with_its_own_chain(url: str, tmp_path: Path) -> None:
    app = App(tmp_path / "app", url)
    app.add(APP_0001)
    app.add(APP_0002)
    app.alembic("upgrade", "head")  # the application's history, before it adds outbox
    assert app.tables() == {"alembic_version", "customers"}

    app.add(APP_0003)
    assert app.alembic("heads").split() == ["app_0003", "(head)"]
    app.alembic("upgrade", "head")
    assert app.tables() == {"alembic_version", "customers"} | OUTBOX_TABLES
    assert app.scalar("SELECT version_num FROM alembic_version") == "app_0003"
    assert app.outbox_version() == HEAD
    app.check_no_changes()

    # The outbox tables work as made by the shipped revision (seq numbering, capture's insert).
    engine = sa.create_engine(url)
    try:
        with sa.orm.Session(engine) as s:
            s.add_all([outbox.new_event("system", "t.a"), outbox.new_event("system", "t.b")])
            s.commit()
            assert s.scalars(sa.select(outbox.Event.seq).order_by(outbox.Event.seq)).all() \
                == [1, 2]
    finally:
        engine.dispose()

    app.alembic("downgrade", "-1")  # removes the outbox tables, and only them
    assert app.tables() == {"alembic_version", "customers"}
    assert app.scalar("SELECT version_num FROM alembic_version") == "app_0002"
    assert app.scalar("SELECT count(*) FROM customers") == 0
    app.alembic("upgrade", "head")
    assert app.tables() >= OUTBOX_TABLES


@pytest.fixture
def later(tmp_path: Path) -> Path:
    """The versions directory of "a later outbox release": the package's plus one revision."""
    path = tmp_path / "outbox-later" / "versions"
    shutil.copytree(outbox.migrations.VERSIONS, path,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (path / f"{EXTRA}_test.py").write_text(EXTRA_REVISION.format(down=outbox.migrations.head()))
    return path


def test_a_later_outbox_revision_takes_one_more_revision_of_the_application(
    url: str, tmp_path: Path, later: Path
) -> None:
    app = App(tmp_path / "app", url)
    for rev in (APP_0001, APP_0002, APP_0003):
        app.add(rev)
    app.alembic("upgrade", "head")  # deployed with the current outbox

    app.env["TEST_OUTBOX_VERSIONS"] = str(later)  # the application upgrades the package …
    app.check_no_changes()  # … which changes nothing by itself
    app.add(APP_0004)  # and adds one revision
    assert app.alembic("heads").split() == ["app_0004", "(head)"]
    app.alembic("upgrade", "head")
    assert app.outbox_version() == EXTRA
    assert app.scalar("SELECT count(*) FROM outbox_dead_letters") == 1
    app.check_no_changes()

    app.alembic("downgrade", "-1")
    assert app.outbox_version() == HEAD
    assert app.scalar("SELECT count(*) FROM outbox_dead_letters") == 0
    app.alembic("downgrade", "-1")
    assert app.tables() == {"alembic_version", "customers"}

    # A new database goes through both application revisions in one `upgrade head`.
    app.alembic("downgrade", "base")
    assert app.tables() == {"alembic_version"}
    app.alembic("upgrade", "head")
    assert app.outbox_version() == EXTRA
    assert app.scalar("SELECT count(*) FROM outbox_dead_letters") == 1


def test_the_repository_environment_and_the_recipe_record_the_same_version(
    pg_url: str, tmp_path: Path
) -> None:
    """A database migrated with the repository's `alembic upgrade head` is carried on by an
    application that adds the recipe later: its revision finds the head and does nothing."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", pg_url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    app = App(tmp_path / "app", pg_url)
    for rev in (APP_0001, APP_0002, APP_0003):
        app.add(rev)
    app.alembic("upgrade", "head")
    assert app.outbox_version() == HEAD
    app.check_no_changes()


def test_mistakes_are_one_clear_error(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match=r"inside an Alembic revision.*upgrade\(\)"):
        outbox.migrations.upgrade("head")
    engine = sa.create_engine(pg_url)
    try:
        outbox.create_schema(engine)  # tables, but no revision recorded
    finally:
        engine.dispose()
    app = App(tmp_path / "app", pg_url)
    for rev in (APP_0001, APP_0003):
        app.add(rev if rev is not APP_0003 else ("app_0003", "app_0001", *rev[2:]))
    failed = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=app.path,
                            env={**os.environ, **app.env}, capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode != 0
    assert "records no revision" in failed.stderr and "docs/alembic.md" in failed.stderr
    app.add(("app_0003", "app_0001", "outbox", "import outbox.migrations\n",
             '\n    outbox.migrations.upgrade("outbox_0042")', "\n    pass"))
    failed = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=app.path,
                            env={**os.environ, **app.env}, capture_output=True, text=True,
                            timeout=120)
    assert "unknown outbox revision 'outbox_0042' (known: base, outbox_0001" in failed.stderr


def test_moving_from_the_earlier_two_branch_recipe(pg_url: str, tmp_path: Path) -> None:
    """docs/alembic.md: the SQL that moves the outbox head out of alembic_version."""
    app = App(tmp_path / "app", pg_url)
    for rev in (APP_0001, APP_0002):
        app.add(rev)
    ini = app.path / "alembic.ini"
    recipe = ini.read_text()
    ini.write_text(recipe.replace(
        "path_separator = os",
        "path_separator = space\nversion_locations = %(here)s/migrations/versions "
        "outbox:migrations/versions"))
    app.alembic("upgrade", "heads")  # the earlier recipe: two heads
    doc = (ROOT / "docs" / "alembic.md").read_text()
    sql = doc.split("-- earlier recipe: move the outbox head out of alembic_version", 1)[1]
    sql = sql.split("-- create_schema()", 1)[0]
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    ini.write_text(recipe)
    app.add(APP_0003)
    assert app.alembic("heads").split() == ["app_0003", "(head)"]
    app.alembic("upgrade", "head")  # finds the head recorded: nothing to run
    assert app.scalar("SELECT version_num FROM alembic_version") == "app_0003"
    assert app.outbox_version() == HEAD
    app.check_no_changes()


def test_the_relay_says_when_the_schema_is_behind_the_package(
    pg_url: str, later: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", pg_url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    engine = sa.create_engine(pg_url)
    try:
        assert outbox.migrations.mismatch(engine) is None
        # the package was upgraded: a newer revision file, and HEAD names it
        monkeypatch.setattr(outbox.migrations, "VERSIONS", later)
        monkeypatch.setattr(outbox.migrations, "HEAD", "outbox_9001")
        assert "add a revision calling outbox.migrations.upgrade('outbox_9001')" in str(
            outbox.migrations.mismatch(engine))
        relay = Relay(engine, broker=outbox.Broker(MemoryProvider()))
        with caplog.at_level(logging.WARNING, logger="outbox.relay"):
            anyio.run(relay.start)
        assert f"revision {HEAD}, this version of outbox ships outbox_9001" in caplog.text
        with engine.begin() as conn:  # a schema newer than the package
            conn.execute(outbox.migrations.version_table.update().values(version_num="x_9"))
        monkeypatch.undo()
        assert "does not know" in str(outbox.migrations.mismatch(engine))
    finally:
        engine.dispose()

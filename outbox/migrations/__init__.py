"""The outbox's Alembic revisions (``versions/``), applied from an application's own revisions.

An application keeps **one** chain of revisions, and so a single head: ``alembic upgrade head``,
``alembic revision --autogenerate`` and ``alembic check`` keep working. One of its revisions
brings the outbox schema to a given outbox revision::

    import outbox.migrations

    def upgrade() -> None:
        outbox.migrations.upgrade("outbox_0001")

    def downgrade() -> None:
        outbox.migrations.downgrade("base")

The outbox revisions run inside that revision, with Alembic's ``op`` on the application's
connection and in its transaction. Which outbox revision a database is at is recorded in a
table of its own, ``outbox_alembic_version`` (the layout of Alembic's version table, part of
``outbox.Event.metadata`` so autogenerate sees no difference). A later outbox release that ships
a revision asks for one more application revision calling ``upgrade("<new>")`` /
``downgrade("<previous>")``. The repository's own ``alembic.ini`` (``alembic upgrade head`` with
``OUTBOX_DATABASE_URL``) records its version in the same table, so a database set up either way
can be carried on the other. See docs/alembic.md.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox._sql.ddl import PG_DONE_TABLE, PG_LIVE_TABLE
from outbox.events import OutboxBase
from outbox.exceptions import MigrationError

if TYPE_CHECKING:
    from alembic.script import Script

__all__ = [
    "HEAD", "VERSIONS", "VERSION_TABLE", "MigrationError", "current", "downgrade", "head",
    "include_object", "mismatch", "upgrade",
]

#: Where the outbox's revision files are.
VERSIONS = Path(__file__).with_name("versions")
#: The table recording the outbox revision a database is at.
VERSION_TABLE = "outbox_alembic_version"
#: The newest revision in :data:`VERSIONS` (what :func:`head` reads from the files; a test keeps
#: the two equal). Known without Alembic, so that a relay's start need not import it.
HEAD = "outbox_0004"

# Alembic's own version table layout (alembic.ddl.impl.version_table_impl), so that the
# repository's environment, which uses it as its version_table, and this module agree.
version_table = sa.Table(
    VERSION_TABLE,
    OutboxBase.metadata,
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),
)


@functools.lru_cache(maxsize=4)
def _chain(versions: Path) -> tuple[Script, ...]:
    """The outbox revisions in ``versions``, oldest first (they form one straight line)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(versions.parent), version_locations=[str(versions)])
    heads = script.get_heads()
    if len(heads) != 1:
        raise MigrationError(f"the outbox revisions in {versions} have {len(heads)} heads")
    chain = list(script.walk_revisions("base", heads[0]))
    chain.reverse()
    return tuple(chain)


def _revisions() -> tuple[Script, ...]:
    return _chain(Path(VERSIONS))


def _index(revision: str | None, chain: tuple[Script, ...]) -> int:
    """Position of ``revision`` in ``chain``: -1 for base/None, len-1 for head."""
    if revision is None or revision == "base":
        return -1
    if revision == "head":
        return len(chain) - 1
    for i, script in enumerate(chain):
        if script.revision == revision:
            return i
    known = ", ".join(s.revision for s in chain)
    raise MigrationError(f"unknown outbox revision {revision!r} (known: base, {known}, head)")


def head() -> str:
    """The newest outbox revision this installation ships."""
    return _revisions()[-1].revision


def current(bind: sa.Connection | sa.Engine) -> str | None:
    """The outbox revision ``bind``'s database is at (``None``: no outbox schema recorded)."""
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return current(conn)
    if not sa.inspect(bind).has_table(VERSION_TABLE):
        return None
    rows = bind.execute(sa.select(version_table.c.version_num)).scalars().all()
    if len(rows) > 1:
        raise MigrationError(f"{VERSION_TABLE} holds {len(rows)} rows ({', '.join(rows)}); "
                             "expected one")
    return rows[0] if rows else None


def mismatch(bind: sa.Connection | sa.Engine) -> str | None:
    """What to do when ``bind``'s outbox revision is not the newest this installation ships
    (``None`` when it is, or when no revision is recorded). The relay logs it at start."""
    at = current(bind)
    if at is None or at == HEAD:
        return None  # the usual case, answered without reading the revision files
    if at not in {s.revision for s in _revisions()}:
        return (f"the outbox tables are at revision {at}, which this version of outbox does "
                f"not know (it ships up to {HEAD}): is an older outbox running on a newer "
                "schema?")
    return (f"the outbox tables are at revision {at}, this version of outbox ships {HEAD}: "
            f"add a revision calling outbox.migrations.upgrade({HEAD!r}) (docs/alembic.md)")


def upgrade(revision: str = "head") -> None:
    """Bring the outbox schema up to ``revision``; call it from an Alembic revision's
    ``upgrade()``. A database already at or past ``revision`` is left as it is."""
    _migrate(revision, up=True)


def downgrade(revision: str) -> None:
    """Take the outbox schema down to ``revision`` (``"base"``: remove every outbox table);
    call it from the ``downgrade()`` of the revision whose ``upgrade()`` brought it up."""
    _migrate(revision, up=False)


def _migrate(revision: str, *, up: bool) -> None:
    from alembic import op

    name = "upgrade" if up else "downgrade"
    try:
        context = op.get_context()
    except (NameError, AttributeError):  # no Alembic operation is running
        raise MigrationError(
            f"outbox.migrations.{name}() runs inside an Alembic revision: call it from the "
            f"{name}() function of one of your application's revisions (docs/alembic.md)"
        ) from None
    if context.as_sql:
        raise MigrationError(
            f"outbox.migrations.{name}() needs a database connection: it reads the outbox "
            "revision from the database, which offline mode (--sql) cannot do"
        )
    chain = _revisions()
    target = _index(revision, chain)
    bind = op.get_bind()
    at = current(bind)
    if at is None and sa.inspect(bind).has_table("events"):
        raise MigrationError(
            f"the outbox tables exist but {VERSION_TABLE} records no revision (made by "
            "outbox.create_schema(), or by the earlier recipe that put the outbox branch in "
            "alembic_version): record it first, see docs/alembic.md"
        )
    position = _index(at, chain)
    if up:
        steps = [(s, s.module.upgrade) for s in chain[position + 1:target + 1]]
    else:
        steps = [(s, s.module.downgrade) for s in reversed(chain[target + 1:position + 1])]
    if not steps:
        return
    if position < 0:  # first outbox revision: the version table comes with it
        version_table.create(bind, checkfirst=True)
    for _script, step in steps:
        step()
    _record(bind, chain[target].revision if target >= 0 else None, at)


def _record(bind: sa.Connection, revision: str | None, previous: str | None) -> None:
    if revision is None:
        version_table.drop(bind)
    elif previous is None:
        bind.execute(version_table.insert().values(version_num=revision))
    else:
        bind.execute(version_table.update().values(version_num=revision))


_PARTITIONS = frozenset({PG_LIVE_TABLE, PG_DONE_TABLE})


def include_object(obj: object, name: str | None, type_: str, reflected: bool,
                   compare_to: object | None) -> bool:
    """Alembic ``include_object`` hook for an environment that compares ``outbox.Event.metadata``.

    The mapping describes the single-table layout of SQLite and MariaDB; on PostgreSQL ``events``
    is partitioned, with its keys and indexes on the partitions ``events_live`` and
    ``events_done`` (docs/relay.md, "Storage"). This hides what autogenerate cannot compare: the
    partitions, and the single-table indexes and keys where the database does not have them
    (their DDL is conditional, ``ddl_if``). Everything else is compared as usual::

        context.configure(..., target_metadata=[Base.metadata, outbox.Event.metadata],
                          include_object=outbox.migrations.include_object)
    """
    if type_ == "table" and reflected and name in _PARTITIONS:
        return False
    single_table_only = (
        type_ in ("index", "unique_constraint") and not reflected and compare_to is None
        and getattr(obj, "_ddl_if", None) is not None
        and getattr(getattr(obj, "table", None), "metadata", None) is OutboxBase.metadata
    )
    return not single_table_only

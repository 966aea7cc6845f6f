"""The private SQLAlchemy attributes capture reads, each where SQLAlchemy has no public API for it.

Everything else capture needs goes through public API (``Mapper.get_property_by_column``,
``UpdateBase.entity_description``, ``Result.keys()``, ``InstanceState``). These eight are read
here and nowhere else, so a SQLAlchemy release that changes one breaks one function, and
``tests/unit/test_capture_sqlalchemy_internals.py`` — which checks each against the installed
SQLAlchemy and names the versions it was checked on (:data:`CHECKED_ON`) — fails before users
see it. Those that decide whether events are written are read directly (no ``getattr`` with a
default): if one disappears, capture raises instead of silently writing no events.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.mapper import _all_registries
from sqlalchemy.sql.elements import ClauseElement

__all__ = [
    "CHECKED_ON",
    "all_mappers",
    "cursor_result",
    "prefetched_columns",
    "returns_defaults",
    "set_rowcount",
    "unit_of_work_statement",
    "update_key_param",
    "upsert_clause",
]

#: The SQLAlchemy releases the functions below were checked on (the oldest and the newest that
#: pyproject.toml's ``SQLAlchemy>=2.0.30,<2.2`` allows at the time of writing).
CHECKED_ON = ("2.0.30", "2.1.9")


def all_mappers() -> list[Mapper[Any]]:
    """Every mapper of every registry in the process.

    Core DML on a table run through a captured session names no mapped class; with
    ``capture(models=None)`` the table's mapper may belong to any registry, and SQLAlchemy keeps
    the list of registries only in the private ``sqlalchemy.orm.mapper._all_registries()``.
    """
    return [m for reg in list(_all_registries()) for m in reg.mappers]


def returns_defaults(stmt: Any) -> bool:
    """True when ``stmt.return_defaults()`` was called (``UpdateBase._return_defaults``).

    Capture adds its own ``RETURNING``; the two cannot be combined, so such a statement is
    refused. SQLAlchemy offers no public way to ask.
    """
    return bool(stmt._return_defaults)


def upsert_clause(stmt: Any) -> ClauseElement | None:
    """The ``ON CONFLICT`` / ``ON DUPLICATE KEY`` clause of an INSERT (``_post_values_clause``).

    PostgreSQL's and SQLite's ``on_conflict_do_*()`` and MySQL's ``on_duplicate_key_update()``
    store their clause there; SQLAlchemy offers no public accessor.
    """
    clause: ClauseElement | None = stmt._post_values_clause
    return clause


def set_rowcount(result: CursorResult[Any], rowcount: int) -> None:
    """Make ``result.rowcount`` report ``rowcount`` (``DefaultExecutionContext._rowcount``).

    pysqlite reports 0 for ``UPDATE/DELETE … RETURNING`` until the rows are fetched, and
    ``CursorResult.rowcount`` memoizes what it read first; capture fetched the rows (they are
    exactly the rows affected) and hands the caller a result whose rowcount says so.
    """
    result.context._rowcount = rowcount
    result.__dict__.pop("rowcount", None)  # CursorResult.rowcount is a memoized property


def cursor_result(result: Result[Any]) -> CursorResult[Any] | None:
    """The ``CursorResult`` under the result of an ORM-enabled statement (``IteratorResult.raw``).

    ORM DML with ``RETURNING`` wraps the cursor's result; the caller of a bulk statement expects
    the cursor's (its ``rowcount``). ``raw`` is not underscored but not documented either.
    """
    if isinstance(result, CursorResult):
        return result
    raw = getattr(result, "raw", None)
    return raw if isinstance(raw, CursorResult) else None


def unit_of_work_statement(execution_options: Any) -> bool:
    """True for a statement of the unit of work's mapper persistence (INSERT/UPDATE/DELETE of
    objects), False for others run during a flush (``secondary`` association rows).

    SQLAlchemy's ``orm/persistence.py`` executes every statement it builds with
    ``execution_options={"compiled_cache": mapper._compiled_cache}``; the association rows of
    ``orm/dependency.py`` (``ManyToManyDP._run_crud``) are executed without options.
    """
    return "compiled_cache" in execution_options


def prefetched_columns(context: Any) -> list[Any]:
    """The columns whose values SQLAlchemy computed in Python for a statement
    (``SQLCompiler.prefetch``: ``default`` / ``onupdate`` callables and scalars)."""
    compiled = getattr(context, "compiled", None)
    return list(getattr(compiled, "prefetch", None) or ())


def update_key_param(column: Any) -> str:
    """The parameter name under which the unit of work's UPDATE binds a primary-key column in
    its WHERE clause (``orm/persistence.py``: ``bindparam(col._label)``)."""
    label: str = column._label
    return label

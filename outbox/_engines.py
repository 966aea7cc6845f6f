"""The engines outbox makes from a URL (relay, CLI, database provider, inbox): driver options
written in the URL, and PgBouncer mode.

**URL options.** SQLAlchemy hands every ``?key=value`` of a URL to the driver as a string.
libpq options (``sslmode``, ``connect_timeout``, ``options``, …) are strings and pass through;
psycopg's own Python-level options are not: ``?prepare_threshold=0`` used to reach psycopg as
``"0"`` and fail every query with ``TypeError``. :func:`engine_args` converts
``prepare_threshold`` (a number from 1, or ``none``: no prepared statements) and refuses, in one
line, ``0`` (psycopg then prepares every statement, which the relay's multi-command statements
cannot be; it does not turn preparing off) and the options SQLAlchemy manages itself
(``autocommit``, ``row_factory``, ``cursor_factory``, ``context``).

**PgBouncer mode** (``database.pgbouncer``, ``--pgbouncer``, ``OUTBOX_DATABASE_PGBOUNCER``): for a
URL that points at PgBouncer in transaction pooling, where consecutive transactions of one client
connection may run on different server connections:

- no server-side prepared statements (psycopg ``prepare_threshold=None``; a
  ``?prepare_threshold=`` in the URL still wins, for PgBouncer ≥ 1.21 with
  ``max_prepared_statements``);
- no session state: the relay sets its settings with ``SET LOCAL`` in each transaction;
- no ``LISTEN`` through the pooler: the relay and the database provider poll, or listen on a
  direct connection given as ``database.listen_url``.

Applications' own engines need only the first point: ``create_engine(url,
connect_args={"prepare_threshold": None})`` (docs/pgbouncer.md).

**Driver.** ``postgres://…`` and ``postgresql://…`` (no ``+driver``) mean psycopg 3 here when it
is installed: platforms hand out ``postgres://`` URLs, which SQLAlchemy itself refuses. The
engines made here are sync: an async application's URL (``+psycopg_async``, ``+aiosqlite``) runs
on the same library's sync mode (:func:`sync_url`); async-only drivers are refused in one line.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from outbox import _json
from outbox._redact import url_text
from outbox.exceptions import ConfigError

__all__ = ["PGBOUNCER_CONNECT_ARGS", "create_engine", "engine_args", "sync_url"]

#: ``connect_args`` for a psycopg engine behind PgBouncer in transaction pooling.
PGBOUNCER_CONNECT_ARGS: dict[str, Any] = {"prepare_threshold": None}

_PSYCOPG = ("psycopg", "psycopg_async")
# psycopg.connect() keywords that are Python objects, not libpq options; SQLAlchemy sets these.
_MANAGED = ("autocommit", "row_factory", "cursor_factory", "context")
_NONE = ("none", "null", "")
#: Async drivers whose library has a sync mode taking the same URL options.
_SYNC_MODE = {"psycopg_async": "psycopg", "aiosqlite": "pysqlite"}
#: Async-only drivers, and the sync driver to name instead.
_ASYNC_ONLY = {"asyncpg": "psycopg", "aiomysql": "pymysql", "asyncmy": "pymysql"}


def _prepare_threshold(text: str) -> int | None:
    if text.strip().lower() in _NONE:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError("", f"database URL option prepare_threshold={text!r}: expected a "
                          "whole number (statements run that often are prepared) or none")
    if value == 0:  # psycopg: 0 prepares *every* statement, it does not turn preparing off
        raise ConfigError("", "database URL option prepare_threshold=0 prepares every "
                          "statement (the relay's multi-command ones cannot be): use "
                          "prepare_threshold=none to turn prepared statements off (PgBouncer), "
                          "or a number from 1")
    return value


def _driver_named(url: URL) -> URL:
    """``postgres://`` (libpq's and many platforms' spelling, which SQLAlchemy refuses with
    "Can't load plugin") and a ``postgresql://`` without a driver (SQLAlchemy's default is
    psycopg2) as ``postgresql+psycopg://`` when psycopg 3 is installed, the driver of the
    ``postgres`` extra."""
    name = url.drivername
    backend, _, driver = name.partition("+")
    if backend == "postgres":
        return url.set(drivername=f"postgresql+{driver or _default_pg_driver()}")
    if name == "postgresql" and _default_pg_driver() == "psycopg":
        return url.set(drivername="postgresql+psycopg")
    return url


def _default_pg_driver() -> str:
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") is not None else "psycopg2"


def engine_args(url: str | URL, *, pgbouncer: bool = False) -> tuple[URL, dict[str, Any]]:
    """``(url, connect_args)`` for ``create_engine``: the URL with its driver named (see
    :func:`_driver_named`), without the driver options that must be Python values, and those
    options converted (see the module doc)."""
    parsed = _driver_named(sa.make_url(url))
    is_psycopg = parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in _PSYCOPG
    if pgbouncer and not is_psycopg:
        raise ConfigError("database.pgbouncer", "PgBouncer mode is for PostgreSQL with "
                          "psycopg (postgresql+psycopg://…)")
    if not is_psycopg:
        return parsed, {}
    connect_args: dict[str, Any] = dict(PGBOUNCER_CONNECT_ARGS) if pgbouncer else {}
    query = dict(parsed.query)
    for name in _MANAGED:
        if name in query:
            raise ConfigError("", f"database URL option {name!r} is not supported: SQLAlchemy "
                              "manages it")
    if "prepare_threshold" in query:
        value = query.pop("prepare_threshold")
        connect_args["prepare_threshold"] = _prepare_threshold(
            value if isinstance(value, str) else value[-1])
        parsed = parsed.set(query=query)
    return parsed, connect_args


def sync_url(url: str | URL) -> URL:
    """``url`` for a sync engine, so that an async application's URL works where outbox runs sync
    code (the relay, the CLI, the database provider, the test recorder): ``+psycopg_async`` and
    ``+aiosqlite`` become the same library's sync mode, with the same options. ``+asyncpg``,
    ``+aiomysql`` and ``+asyncmy`` have no sync mode: :class:`ConfigError`, one line naming the
    driver to use instead (``postgresql+psycopg://`` also serves ``create_async_engine``)."""
    parsed = sa.make_url(url)
    # From the name, not get_driver_name(): that loads the dialect ("postgres://" has none).
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _SYNC_MODE:
        return parsed.set(drivername=f"{backend}+{_SYNC_MODE[driver]}")
    if driver in _ASYNC_ONLY:
        instead = f"{backend}+{_ASYNC_ONLY[driver]}://"
        also = " (create_async_engine takes that URL too)" if driver == "asyncpg" else ""
        raise ConfigError("", f"database URL {url_text(parsed)}: {driver} is an async-only "
                          f"driver and outbox needs a sync engine here: use {instead}…{also}")
    return parsed


def create_engine(url: str | URL, *, pgbouncer: bool = False, **kwargs: Any) -> Engine:
    """``sqlalchemy.create_engine`` with :func:`sync_url` and :func:`engine_args` applied
    (``kwargs`` as there); on psycopg, ``jsonb`` values are parsed with
    :func:`outbox._json.loads` (orjson when installed: the relay and the database bus parse two
    documents per event)."""
    parsed, connect_args = engine_args(sync_url(url), pgbouncer=pgbouncer)
    if connect_args:
        kwargs["connect_args"] = {**connect_args, **kwargs.get("connect_args", {})}
    engine = sa.create_engine(parsed, **kwargs)
    if engine.dialect.driver == "psycopg":
        sa.event.listen(engine, "connect", _fast_json)
    return engine


def _fast_json(dbapi_connection: Any, _record: Any) -> None:
    from psycopg.types.json import set_json_loads

    set_json_loads(_json.loads, dbapi_connection)

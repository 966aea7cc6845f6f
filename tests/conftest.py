"""Shared fixtures: a database / key prefix / stream of its own for every test.

- ``pg_url`` / ``sqlite_url`` / ``mariadb_url``: a fresh, empty database (no outbox schema);
- ``db_url``: parametrised over PostgreSQL and SQLite;
- ``engine``: ``db_url`` with the outbox schema created (``outbox.create_schema``), on SQLite
  with ``outbox.sqlite.sqlite_savepoints`` as recommended for applications;
- ``redis_url`` + ``redis_prefix``, ``nats_url`` + ``nats_names``: shared servers, unique names;
- ``private_redis`` / ``private_nats`` / ``private_postgres``: servers a test may stop and restart;
  ``private_pgbouncer``: a pgbouncer (transaction pooling) in front of the shared PostgreSQL.

Async tests use anyio's pytest plugin on asyncio: ``@pytest.mark.anyio``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from tests import servers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# -- PostgreSQL ---------------------------------------------------------------------------------

PG_ADMIN_URL = servers.pg_url("postgres")


def _pg_admin() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


@contextlib.contextmanager
def new_pg_database() -> Iterator[str]:
    """Create an empty database, yield its URL, drop it afterwards (closing its connections)."""
    servers.require("PostgreSQL", servers.PG_HOST, servers.PG_PORT)
    name = _unique("outbox_t")
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield servers.pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with new_pg_database() as url:
        yield url


# -- SQLite ------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path}/outbox-test.db"


# -- MariaDB -------------------------------------------------------------------------------------


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    servers.require("MariaDB", servers.MARIADB_HOST, servers.MARIADB_PORT)
    name = _unique("outbox_t")
    admin = sa.create_engine(servers.mariadb_url("test"), poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    try:
        yield servers.mariadb_url(name)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


# -- parametrised database + schema --------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database URL, once per supported dialect (PostgreSQL and SQLite)."""
    fixture = "pg_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on ``db_url`` with the outbox schema created; on SQLite configured as
    docs/capture.md recommends for applications (``sqlite_savepoints``: ``begin_nested()``
    works)."""
    eng = outbox.sqlite.sqlite_savepoints(sa.create_engine(db_url))
    outbox.create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    """A PostgreSQL engine with the outbox schema created."""
    eng = sa.create_engine(pg_url)
    outbox.create_schema(eng)
    yield eng
    eng.dispose()


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    servers.require("Redis", servers.REDIS_HOST, servers.REDIS_PORT)
    return servers.redis_url()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of the test's own; every key under it is deleted afterwards."""
    import redis

    prefix = _unique("outbox-test")
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- NATS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatsNames:
    stream: str
    subject_prefix: str


@pytest.fixture
def nats_url() -> str:
    servers.require("NATS", servers.NATS_HOST, servers.NATS_PORT)
    return servers.nats_url()


@pytest.fixture
def nats_names(nats_url: str) -> Iterator[NatsNames]:
    """A JetStream stream name and subject prefix of the test's own; the stream is deleted after."""
    token = uuid.uuid4().hex[:12]
    names = NatsNames(stream=f"OUTBOX_TEST_{token}", subject_prefix=f"test{token}")
    yield names

    import anyio
    import nats

    async def _cleanup() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            # The stream and the ones named after it (dead letters, key-value store).
            with contextlib.suppress(Exception):
                for name in await js.streams_info():
                    if token in name.config.name:
                        await js.delete_stream(name.config.name)
            with contextlib.suppress(Exception):
                await js.delete_stream(names.stream)
        finally:
            await nc.close()

    anyio.run(_cleanup)


# -- private servers -----------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[servers.PrivateRedis]:
    server = servers.PrivateRedis()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_nats() -> Iterator[servers.PrivateNats]:
    server = servers.PrivateNats()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_nats_cluster() -> Iterator[servers.PrivateNatsCluster]:
    """Three routed nats-servers with JetStream (a cluster of the test's own)."""
    cluster = servers.PrivateNatsCluster()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def private_pgbouncer() -> Iterator[servers.PrivatePgBouncer]:
    """pgbouncer in transaction pooling in front of the shared PostgreSQL (its own process)."""
    servers.require("PostgreSQL", servers.PG_HOST, servers.PG_PORT)
    server = servers.PrivatePgBouncer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_postgres() -> Iterator[servers.PrivatePostgres]:
    server = servers.PrivatePostgres()
    server.start()
    yield server
    server.close()


# --------------------------------------------------------------------------------------------
# Tests share one process: a test must leave process-wide state as it found it. The guard below
# fails the test that changed it (the default broker and its handler registry, broker observers,
# the root logger's handlers and level, the instance id, the OpenTelemetry tracer provider, the
# Prometheus default registry), so a leak is fixed where it is made instead of showing up as an
# order-dependent failure somewhere else (an app module imported in-process once left a "*"
# handler on the default broker and turned a later CLI test into a 300 s hang).


def _process_state() -> dict[str, Any]:
    from prometheus_client import REGISTRY

    import outbox.broker.core as core
    import outbox.broker.default as default
    from outbox.events import get_instance_id

    root = logging.getLogger()
    state: dict[str, Any] = {
        "default broker": id(default._default) if default._default is not None else None,
        "subscribe registry": sorted(default._registry),
        "broker observers": list(map(id, core._global_observers)),
        "root logger": (root.level, list(map(id, root.handlers))),
        "outbox logger": (logging.getLogger("outbox").level,
                          list(map(id, logging.getLogger("outbox").handlers))),
        "instance id": get_instance_id(),
        "prometheus registry": sorted(REGISTRY._names_to_collectors),
    }
    try:
        from opentelemetry import trace
    except ImportError:
        pass
    else:
        state["tracer provider"] = id(trace._TRACER_PROVIDER)
    return state


@pytest.fixture(autouse=True)
def _leaves_process_state_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    before = _process_state()
    yield
    after = _process_state()
    changed = sorted(key for key in before if before[key] != after[key])
    if changed:
        pytest.fail(f"{request.node.nodeid} left process-wide state changed: "
                    f"{', '.join(changed)} (restore it where the test sets it)", pytrace=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Importing test modules must not register handlers on the default broker nor capture
    sessions: the guard above runs per test, so a module-level ``@outbox.subscribe`` or
    ``outbox.capture()`` imported at collection would pass it and leak into every test."""
    from outbox.broker import default
    from outbox.testing import captures

    if default._registry:
        names = ", ".join(sorted(entry.name for entry in default._registry.values()))
        raise pytest.UsageError(
            f"collecting the tests registered handlers on the default broker: {names} "
            "(import --app modules only in the subprocesses that run them)"
        )
    # An application module that calls outbox.capture() at import (the examples do, as the docs
    # recommend) captures sessions process-wide: its tests must import it in fixtures.
    if captures():
        raise pytest.UsageError(
            f"collecting the tests called outbox.capture(): {captures()!r} (import application "
            "modules in fixtures, and remove their registration when their tests are done)"
        )

"""Shared fixtures: a database / key prefix / stream of its own for every test.

- ``pg_url`` / ``sqlite_url`` / ``mariadb_url``: a fresh, empty database (no outbox schema);
- ``db_url``: parametrised over PostgreSQL and SQLite;
- ``engine``: ``db_url`` with the outbox schema created (``outbox.create_schema``), on SQLite
  with ``outbox.sqlite_savepoints`` as recommended for applications;
- ``redis_url`` + ``redis_prefix``, ``nats_url`` + ``nats_names``: shared servers, unique names;
- ``private_redis`` / ``private_nats`` / ``private_postgres``: servers a test may stop and restart.

Async tests use anyio's pytest plugin on asyncio: ``@pytest.mark.anyio``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

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

PG_ADMIN_URL = (
    f"postgresql+psycopg://{servers.PG_USER}@{servers.PG_HOST}:{servers.PG_PORT}/postgres"
)


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
        yield f"postgresql+psycopg://{servers.PG_USER}@{servers.PG_HOST}:{servers.PG_PORT}/{name}"
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
    base = f"mysql+pymysql://root@{servers.MARIADB_HOST}:{servers.MARIADB_PORT}"
    admin = sa.create_engine(f"{base}/test", poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    try:
        yield f"{base}/{name}"
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
    """An engine on ``db_url`` with the outbox schema created; on SQLite configured as the README
    recommends for applications (``outbox.sqlite_savepoints``: ``begin_nested()`` works)."""
    eng = outbox.sqlite_savepoints(sa.create_engine(db_url))
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
    return f"redis://{servers.REDIS_HOST}:{servers.REDIS_PORT}/0"


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
    return f"nats://{servers.NATS_HOST}:{servers.NATS_PORT}"


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
def private_postgres() -> Iterator[servers.PrivatePostgres]:
    server = servers.PrivatePostgres()
    server.start()
    yield server
    server.close()

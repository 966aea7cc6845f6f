"""A database of the test session's own, migrated with the example's `alembic upgrade head`.

PostgreSQL on 127.0.0.1:5432 (user postgres, trust), or ``FASTAPI_ASYNC_ADMIN_URL``.
Unreachable: the tests are skipped, or fail when ``CI`` is set.

The application is imported once the database exists (its engine reads the URL at import), and
its capture is removed again when the example's tests are done: the repository's own tests share
the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

APP_DIR = Path(__file__).resolve().parents[1]
EXAMPLES = APP_DIR.parent
ADMIN_URL = os.environ.get("FASTAPI_ASYNC_ADMIN_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="package")
def database_url() -> Iterator[str]:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {admin.url}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"fastapi_async_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = str(sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False))
    os.environ["FASTAPI_ASYNC_DATABASE_URL"] = url  # read by fastapi_async.db at import
    try:
        run("alembic", "upgrade", "head", cwd=APP_DIR)
        yield url
    finally:
        from fastapi_async.db import SessionLocal
        from outbox.testing import captures

        for registration in captures():
            if registration.target is SessionLocal:
                registration.remove()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def run(*args: str, cwd: Path = EXAMPLES, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` as the deployment would run it; fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **kw})
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[Any]:
    """The application's AsyncEngine; its pooled connections belong to the test's event loop,
    so they are closed when the test ends."""
    from fastapi_async.db import engine

    yield engine
    await engine.dispose()


@pytest.fixture
def app(engine: Any) -> Any:
    from fastapi_async.main import app

    return app

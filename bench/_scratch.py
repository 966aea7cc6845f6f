"""A throw-away PostgreSQL database for one benchmark run: created on entry, dropped on exit."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

#: The server every benchmark runs against by default (loopback, trust authentication).
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def scratch_database(prefix: str = "outbox_bench", *, url: str | None = None,
                     admin_url: str = ADMIN) -> Iterator[str]:
    """Yield the URL of a new database ``<prefix>_<random>`` on ``admin_url``'s server, dropped
    (connections and all) on the way out. With ``url`` given, yield it and touch nothing."""
    if url:
        yield url
        return
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"  # generated here, never user input
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

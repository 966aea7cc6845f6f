"""``outbox._engines.sync_url``: the URL an async application gives create_async_engine, for the
sync engines outbox makes (relay, CLI, database provider, test recorder)."""

from __future__ import annotations

import pytest

from outbox._engines import sync_url
from outbox.exceptions import ConfigError


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql+psycopg_async://app:pw@db/app?sslmode=require",
     "postgresql+psycopg://app:pw@db/app?sslmode=require"),
    ("sqlite+aiosqlite:///app.db", "sqlite+pysqlite:///app.db"),
    ("postgresql+psycopg://app@db/app", "postgresql+psycopg://app@db/app"),  # already sync
    ("mysql+pymysql://root@db/app", "mysql+pymysql://root@db/app"),
    ("postgres://app@db/app", "postgres://app@db/app"),  # no driver named: engine_args' part
])
def test_async_drivers_with_a_sync_mode_keep_their_url(url: str, expected: str) -> None:
    assert sync_url(url).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(("url", "instead"), [
    ("postgresql+asyncpg://app:s3cret@db/app", "postgresql+psycopg://"),
    ("mysql+aiomysql://root:s3cret@db/app", "mysql+pymysql://"),
    ("mariadb+asyncmy://root:s3cret@db/app", "mariadb+pymysql://"),
])
def test_async_only_drivers_are_refused_in_one_line(url: str, instead: str) -> None:
    with pytest.raises(ConfigError) as error:
        sync_url(url)
    message = str(error.value)
    assert "\n" not in message and "s3cret" not in message
    assert f"use {instead}" in message and "async-only driver" in message

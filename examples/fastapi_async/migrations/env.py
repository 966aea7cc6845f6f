"""Alembic environment of the example (``alembic init -t async``, trimmed): the application's
tables and the outbox's, one chain, run on the application's async engine."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

import outbox
import outbox.migrations
from fastapi_async.db import engine
from fastapi_async.models import Base

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# The outbox tables are part of what autogenerate compares: it proposes nothing for them.
target_metadata = [Base.metadata, outbox.Event.metadata]


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True, include_object=outbox.migrations.include_object)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())

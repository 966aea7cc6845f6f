"""Alembic environment of the example: the application's tables and the outbox's, one chain."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlmodel import SQLModel

import fastapi_app.models  # noqa: F401 - registers the tables on SQLModel.metadata
import outbox
import outbox.migrations
from fastapi_app.db import engine

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# The outbox tables are part of what autogenerate compares: it proposes nothing for them.
target_metadata = [SQLModel.metadata, outbox.Event.metadata]

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                      include_object=outbox.migrations.include_object)
    with context.begin_transaction():
        context.run_migrations()

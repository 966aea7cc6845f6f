"""Alembic environment of the outbox repository: `alembic upgrade head` from the repo root.

The database comes from ``OUTBOX_DATABASE_URL`` (else ``sqlalchemy.url`` in alembic.ini). The
revision files live in the installed package, ``outbox/migrations/versions``. The revision is
recorded in ``outbox_alembic_version``, the table ``outbox.migrations.upgrade()`` uses inside an
application's own revisions, so a database set up either way can be carried on the other.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import engine_from_config, pool

import outbox
from outbox.migrations import VERSION_TABLE

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = os.environ.get("OUTBOX_DATABASE_URL")
if url:
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))

target_metadata = outbox.Event.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        include_object=outbox.migrations.include_object,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # programmatic use: command.upgrade(cfg) with a connection
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=outbox.migrations.include_object,
                          version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata,
                          include_object=outbox.migrations.include_object,
                          version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""The async engine and sessionmaker — and ``outbox.capture``, here, at import of the module that
makes them: every session of the process made by ``SessionLocal`` is captured, the app's, the
relay's handlers', the tests' and a script's alike."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import outbox

# One URL for the app, Alembic and the relay: ``postgresql+psycopg://`` is psycopg 3, which
# create_async_engine runs in its async mode and the relay (a sync engine) in its sync mode.
DATABASE_URL = os.environ.get(
    "FASTAPI_ASYNC_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/fastapi_async"
)

engine = create_async_engine(DATABASE_URL, pool_size=20, max_overflow=20)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)

# The sessions of SessionLocal (an AsyncSession runs a sync Session inside: the listeners go
# there). Columns that look like secrets (hashed_password, token) stay out of events.
outbox.capture(SessionLocal)

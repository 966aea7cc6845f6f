"""Engines and sessions — and ``outbox.capture``, here, at import of the module that makes the
engine: every session of the process is then captured, the application's, the tests' and a
script's alike (a ``lifespan`` handler would miss sessions made before the app starts)."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlmodel import Session, create_engine
from sqlmodel.ext.asyncio.session import AsyncSession

import outbox

DATABASE_URL = os.environ.get(
    "FASTAPI_APP_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/fastapi_app"
)

engine = create_engine(DATABASE_URL, pool_size=20, max_overflow=20)
async_engine = create_async_engine(DATABASE_URL, pool_size=20, max_overflow=20)
AsyncSessionLocal = async_sessionmaker(async_engine, class_=AsyncSession, expire_on_commit=False)

# Every SQLModel session, sync and async (an AsyncSession runs a Session inside). Columns that
# look like secrets (hashed_password, token) are left out of events without being listed.
outbox.capture(Session)

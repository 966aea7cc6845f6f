"""Dependencies: an ``AsyncSession`` per request, and the authenticated user — the acting user
of the events the request writes (``outbox.fastapi.acting_user``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_async.db import SessionLocal
from fastapi_async.models import ApiToken, User
from outbox.fastapi import acting_user


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_current_user(session: SessionDep,
                           authorization: Annotated[str | None, Header()] = None) -> User:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    query = select(User).join(ApiToken).where(ApiToken.token == token)
    user = (await session.scalars(query)).first()
    if user is None:
        raise HTTPException(401, "invalid token")
    return user


# The one line: the user get_current_user returns is the acting user of the request's events.
CurrentUser = Annotated[User, Depends(acting_user(get_current_user))]

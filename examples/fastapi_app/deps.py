"""Dependencies: a session per request, and the authenticated user — the acting user of the
events the request writes (``outbox.fastapi.acting_user``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException
from sqlmodel import Session, select

from fastapi_app.db import AsyncSessionLocal, engine
from fastapi_app.models import ApiToken, User
from outbox.fastapi import acting_user


def get_session() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    return token


def get_current_user(session: SessionDep,
                     authorization: Annotated[str | None, Header()] = None) -> User:
    """Sync, like most FastAPI apps' (FastAPI runs it in a worker thread)."""
    query = select(User).join(ApiToken).where(ApiToken.token == _token(authorization))
    user = session.exec(query).first()
    if user is None:
        raise HTTPException(401, "invalid token")
    return user


async def get_current_user_async(authorization: Annotated[str | None, Header()] = None) -> User:
    async with AsyncSessionLocal() as session:
        query = select(User).join(ApiToken).where(ApiToken.token == _token(authorization))
        user = (await session.exec(query)).first()
    if user is None:
        raise HTTPException(401, "invalid token")
    return user


# The one line per dependency: the user it returns is the acting user of the request.
CurrentUser = Annotated[User, Depends(acting_user(get_current_user))]
CurrentUserAsync = Annotated[User, Depends(acting_user(get_current_user_async))]

"""``outbox.context()`` in a real FastAPI application (issue: sync ``yield`` dependencies).

FastAPI enters a sync ``yield`` dependency in one worker thread and leaves it in another, each
with its own copy of the request's ``contextvars.Context``: ``ContextVar.reset(token)`` on the way
out raised ``ValueError: <Token …> was created in a different Context`` after the endpoint had
committed — a 500 for a committed change, and the event without its user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(100))


@pytest.fixture
def factory(pg_engine: sa.Engine) -> Iterator[sessionmaker[Session]]:
    Base.metadata.create_all(pg_engine)
    made = sessionmaker(pg_engine)
    with outbox.capture(made, models=Base):
        yield made


def user_ids(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(outbox.Event.user_id).order_by(outbox.Event.seq)))


def notes_app(factory: sessionmaker[Session]) -> FastAPI:
    app = FastAPI()

    def current_user(x_user: str = "anonymous") -> Iterator[str]:
        # the natural place: a sync dependency that authenticates and sets the acting user
        with outbox.context(user_id=x_user):
            yield x_user

    @app.post("/notes")
    def create(text: str, user: str = Depends(current_user)) -> dict[str, Any]:
        with factory() as session:
            note = Note(text=text)
            session.add(note)
            session.commit()
            return {"id": note.id, "user": user}

    return app


async def post(app: Any, path: str, **params: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, params=params)


async def test_a_sync_yield_dependency_with_context_does_not_fail_the_request(
    factory: sessionmaker[Session], pg_engine: sa.Engine
) -> None:
    response = await post(notes_app(factory), "/notes", text="hello", x_user="7")
    assert response.status_code == 200, response.text
    assert len(user_ids(pg_engine)) == 1


async def test_with_the_middleware_the_event_carries_the_dependencys_user(
    factory: sessionmaker[Session], pg_engine: sa.Engine
) -> None:
    from outbox.asgi import ContextMiddleware

    app = notes_app(factory)
    app.add_middleware(ContextMiddleware)
    response = await post(app, "/notes", text="hello", x_user="7")
    assert response.status_code == 200, response.text
    assert user_ids(pg_engine) == ["7"]

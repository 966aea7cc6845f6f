"""``outbox.context()`` in a real FastAPI application (issue: sync ``yield`` dependencies).

FastAPI enters a sync ``yield`` dependency in one worker thread and leaves it in another, each
with its own copy of the request's ``contextvars.Context``: ``ContextVar.reset(token)`` on the way
out raised ``ValueError: <Token …> was created in a different Context`` after the endpoint had
committed — a 500 for a committed change, and the event without its user.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.asgi import ContextMiddleware
from outbox.fastapi import acting_user

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
    app = notes_app(factory)
    app.add_middleware(ContextMiddleware)
    response = await post(app, "/notes", text="hello", x_user="7")
    assert response.status_code == 200, response.text
    assert user_ids(pg_engine) == ["7"]


async def test_without_the_middleware_the_exit_is_quiet_but_says_what_to_install(
    factory: sessionmaker[Session], pg_engine: sa.Engine, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx_module = sys.modules["outbox._context"]  # the package's `context` is the function
    monkeypatch.setattr(ctx_module, "_warned_foreign_exit", False)
    with caplog.at_level(logging.WARNING, logger="outbox.context"):
        response = await post(notes_app(factory), "/notes", text="hello", x_user="7")
    assert response.status_code == 200, response.text
    # The values of a block entered in a discarded copy of the context cannot reach the endpoint:
    # the event has no user, and the log names the fix.
    assert user_ids(pg_engine) == [None]
    assert "outbox.asgi.ContextMiddleware" in caplog.text


class User:
    def __init__(self, id: int) -> None:
        self.id = id


def sync_user(x_user: int) -> User:
    return User(x_user)


async def async_user(x_user: int) -> User:
    return User(x_user)


def sync_yield_user(x_user: int) -> Iterator[User]:
    yield User(x_user)


def helper_app(factory: sessionmaker[Session], dependency: Any) -> FastAPI:
    app = FastAPI()
    current = acting_user(dependency)

    @app.post("/sync")
    def create_sync(text: str, user: User = Depends(current)) -> dict[str, Any]:
        with factory() as session:
            session.add(Note(text=text))
            session.commit()
        return {"user": user.id}

    @app.post("/async")
    async def create_async(text: str, user: User = Depends(current)) -> dict[str, Any]:
        def write() -> None:
            with factory() as session:
                session.add(Note(text=text))
                session.commit()

        await anyio.to_thread.run_sync(write)
        return {"user": user.id}

    return app


@pytest.mark.parametrize("dependency", [sync_user, async_user, sync_yield_user])
@pytest.mark.parametrize("middleware", [False, True])
async def test_acting_user_sets_the_user_for_sync_and_async_endpoints(
    factory: sessionmaker[Session], pg_engine: sa.Engine, dependency: Any, middleware: bool
) -> None:
    app = helper_app(factory, dependency)
    if middleware:
        app.add_middleware(ContextMiddleware)
    for path, user in (("/sync", "3"), ("/async", "4")):
        response = await post(app, path, text="x", x_user=user)
        assert response.status_code == 200, response.text
    assert user_ids(pg_engine) == ["3", "4"]


async def test_acting_user_holds_for_a_session_dependency_that_commits_on_exit(
    factory: sessionmaker[Session], pg_engine: sa.Engine
) -> None:
    """Dependencies exit in reverse order: the session dependency commits after the user
    dependency has exited. With the middleware the user holds until the request ends."""
    app = FastAPI()
    app.add_middleware(ContextMiddleware)

    def get_session() -> Iterator[Session]:
        with factory() as session:
            yield session
            session.commit()  # unit of work per request: flushes (writes the events) here

    current = acting_user(sync_user)

    @app.post("/notes")
    def create(text: str, session: Session = Depends(get_session),
               user: User = Depends(current)) -> dict[str, Any]:
        session.add(Note(text=text))
        return {"user": user.id}

    response = await post(app, "/notes", text="x", x_user="5")
    assert response.status_code == 200, response.text
    assert user_ids(pg_engine) == ["5"]


async def test_set_context_in_a_plain_dependency_reaches_background_tasks(
    factory: sessionmaker[Session], pg_engine: sa.Engine
) -> None:
    app = FastAPI()
    app.add_middleware(ContextMiddleware, metadata=lambda scope: {"path": scope["path"]})

    def authenticate(x_user: int) -> int:  # sync, runs in a worker thread
        outbox.set_context(user_id=x_user)
        return x_user

    def write(text: str) -> None:
        with factory() as session:
            session.add(Note(text=text))
            session.commit()

    async def write_async(text: str) -> None:
        await anyio.to_thread.run_sync(write, text)

    @app.post("/notes")
    def create(tasks: BackgroundTasks, user: int = Depends(authenticate)) -> dict[str, Any]:
        tasks.add_task(write, "sync task")
        tasks.add_task(write_async, "async task")
        return {"user": user}

    response = await post(app, "/notes", x_user="8")
    assert response.status_code == 200, response.text
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.Event.user_id, outbox.Event.meta)).all()
    assert [(r[0], r[1]) for r in rows] == [("8", {"path": "/notes"})] * 2


async def test_concurrent_requests_keep_their_own_users(
    factory: sessionmaker[Session], pg_engine: sa.Engine
) -> None:
    app = helper_app(factory, sync_yield_user)
    app.add_middleware(ContextMiddleware)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def one(i: int) -> None:
            response = await client.post("/sync" if i % 2 else "/async",
                                         params={"text": str(i), "x_user": str(i)})
            assert response.status_code == 200, response.text

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
    with pg_engine.connect() as conn:
        pairs = conn.execute(sa.text(
            "SELECT e.user_id, e.payload->>'text' FROM events e")).all()
    assert len(pairs) == 40
    assert all(user == text for user, text in pairs)


async def test_acting_user_needs_an_id_or_a_user_id_function() -> None:
    from outbox._context import current_context

    def who(x_user: str) -> dict[str, str]:
        return {"name": x_user}

    app = FastAPI()

    @app.get("/default")
    async def default(user: Any = Depends(acting_user(who))) -> Any:
        return user

    @app.get("/mapped")
    async def mapped(user: Any = Depends(acting_user(who, user_id=lambda u: u["name"]))) -> Any:
        return current_context().user_id

    with pytest.raises(outbox.OutboxError, match=r"acting_user\(.*who\).*user_id=lambda"):
        await post_get(app, "/default", x_user="a")
    response = await post_get(app, "/mapped", x_user="ada")
    assert response.json() == "ada"


async def post_get(app: Any, path: str, **params: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, params=params)

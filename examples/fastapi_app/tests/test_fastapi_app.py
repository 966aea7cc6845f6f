"""The example application, as its users and its operators see it.

Requests go through the ASGI app in process (``httpx.ASGITransport``), and, for the load test,
through a real uvicorn server. The relay runs as the sidecar the README shows:
``python -m outbox.relay --once --app fastapi_app.handlers``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa

import outbox
from fastapi_app.tests.conftest import APP_DIR, EXAMPLES, run

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c


async def sign_up(client: httpx.AsyncClient, name: str = "ada") -> tuple[int, dict[str, str]]:
    email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    r = await client.post("/signup", json={"email": email, "password": "s3cret!",
                                           "full_name": name.title()})
    assert r.status_code == 201, r.text
    body = r.json()
    return body["id"], {"Authorization": f"Bearer {body['token']}"}


def events(engine: sa.Engine, **where: Any) -> list[outbox.Event]:
    query = sa.select(outbox.Event).order_by(outbox.Event.seq)
    for column, value in where.items():
        query = query.where(getattr(outbox.Event, column) == value)
    with sa.orm.Session(engine) as session:
        return list(session.scalars(query))


async def test_signup_writes_events_without_the_secrets(
    client: httpx.AsyncClient, engine: sa.Engine
) -> None:
    user_id, _ = await sign_up(client)
    (user_event,) = events(engine, type="public.user.create", entity_id=str(user_id))
    assert set(user_event.payload) == {"id", "email", "full_name"}  # no hashed_password
    (token_event,) = [e for e in events(engine, type="public.apitoken.create")
                      if e.payload["user_id"] == user_id]
    assert set(token_event.payload) == {"id", "user_id"}  # no token
    assert user_event.user_id is None and token_event.user_id is None  # nobody signed in


async def test_the_authenticated_user_is_on_the_events_of_sync_and_async_endpoints(
    client: httpx.AsyncClient, engine: sa.Engine
) -> None:
    user_id, auth = await sign_up(client)
    for path in ("/items", "/items/async"):
        r = await client.post(path, json={"title": path}, headers=auth)
        assert r.status_code == 201, r.text
    created = events(engine, type="public.item.create", user_id=str(user_id))
    assert [e.payload["title"] for e in created] == ["/items", "/items/async"]
    r = await client.post("/items", json={"title": "x"})
    assert r.status_code == 401


async def test_a_request_failing_after_its_flush_leaves_no_event(
    client: httpx.AsyncClient, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi_app import main

    user_id, auth = await sign_up(client)
    monkeypatch.setattr(main, "MAX_ITEMS", 2)
    r = await client.post("/items/batch", json=["a", "b", "c"], headers=auth)
    assert r.status_code == 409  # flushed (ids assigned, events written), then refused
    assert events(engine, type="public.item.create", user_id=str(user_id)) == []
    r = await client.post("/items/batch", json=["a", "b"], headers=auth)
    assert r.status_code == 201
    assert len(events(engine, type="public.item.create", user_id=str(user_id))) == 2


async def test_the_relay_sidecar_runs_the_handler_once_per_event(
    client: httpx.AsyncClient, engine: sa.Engine, database_url: str
) -> None:
    user_id, auth = await sign_up(client, "grace")
    for title in ("one", "two"):
        assert (await client.post("/items", json={"title": title}, headers=auth)).status_code \
            == 201
    for _ in range(2):  # a second run finds nothing to do: no duplicate activity
        run("outbox.relay", "--once", "--app", "fastapi_app.handlers",
            OUTBOX_DATABASE_URL=database_url)
    with engine.connect() as conn:
        texts = conn.scalars(sa.text("SELECT text FROM activity WHERE user_id = :u"),
                             {"u": user_id}).all()
    # the two items' events have different ordering keys: handled in any order
    assert sorted(texts) == ["created item 'one'", "created item 'two'"]
    assert {e.status for e in events(engine, user_id=str(user_id))} == {"completed"}
    # the handler's own writes are attributed to the user who caused them
    assert len(events(engine, type="public.activity.create", user_id=str(user_id))) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[str]:
    """The app under uvicorn, as deployed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fastapi_app.main:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=EXAMPLES, env={**os.environ, "FASTAPI_APP_DATABASE_URL": database_url})
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_200_concurrent_requests_each_write_their_own_user(
    server: str, engine: sa.Engine
) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=60,
                                 limits=httpx.Limits(max_connections=200)) as client:
        users = [await sign_up(client, f"user{i}") for i in range(10)]
        batch = uuid.uuid4().hex[:8]
        failures: list[str] = []

        async def request(i: int) -> None:
            user_id, auth = users[i % len(users)]
            path = "/items" if i % 2 else "/items/async"  # sync and async dependencies
            r = await client.post(path, json={"title": f"{batch}:{i}:{user_id}"}, headers=auth)
            if r.status_code != 201:
                failures.append(f"{path}: {r.status_code} {r.text}")

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(request, i)
    assert failures == []
    created = [e for e in events(engine, type="public.item.create")
               if e.payload["title"].startswith(f"{batch}:")]
    assert len(created) == 200
    wrong = [(e.user_id, e.payload["title"]) for e in created
             if e.user_id != e.payload["title"].rsplit(":", 1)[1]
             or e.user_id != str(e.payload["owner_id"])]
    assert wrong == []


def test_the_models_and_the_migrations_agree(database_url: str) -> None:
    """`alembic check` after `alembic upgrade head` (the session's database): the outbox's
    tables are in the chain and in target_metadata, so autogenerate proposes nothing."""
    done = run("alembic", "check", cwd=APP_DIR)
    assert "No new upgrade operations detected" in done.stdout + done.stderr

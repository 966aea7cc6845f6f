"""The async SQLAlchemy example, as its users and its operators see it.

Requests go through the ASGI app in process (``httpx.ASGITransport``); the relay runs as the
sidecar the README shows: ``python -m outbox.relay --once --app fastapi_async.handlers``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import outbox
from fastapi_async.tests.conftest import APP_DIR, run

pytestmark = pytest.mark.anyio


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


async def events(engine: Any, **where: Any) -> list[outbox.Event]:
    query = sa.select(outbox.Event).order_by(outbox.Event.seq)
    for column, value in where.items():
        query = query.where(getattr(outbox.Event, column) == value)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [outbox.Event(**row._mapping) for row in rows]


async def test_events_carry_the_authenticated_user_and_no_secrets(
    client: httpx.AsyncClient, engine: Any, outbox_recorder: Any
) -> None:
    outbox_recorder.watch(engine)  # rows committed to `events` from now on
    user_id, auth = await sign_up(client)
    outbox_recorder.assert_emitted("public.users.create", payload={"id": user_id}, user_id=None)
    token = outbox_recorder.assert_emitted("public.api_tokens.create")
    assert set(token.payload) == {"id", "user_id"}  # the token column looks like a secret
    (user,) = outbox_recorder.find("public.users.create", entity_id=str(user_id))
    assert "hashed_password" not in user.payload

    r = await client.post("/items", json={"title": "first"}, headers=auth)
    assert r.status_code == 201, r.text
    item_id = r.json()["id"]
    r = await client.patch(f"/items/{item_id}", json={"title": "renamed"}, headers=auth)
    assert r.status_code == 200, r.text
    outbox_recorder.assert_emitted("public.items.create", payload={"title": "first"},
                                   user_id=str(user_id))
    outbox_recorder.assert_emitted(
        "public.items.update", user_id=str(user_id),
        metadata={"changes": {"title": {"old": "first", "new": "renamed"}}})
    assert (await client.post("/items", json={"title": "x"})).status_code == 401


async def test_the_relay_sidecar_runs_the_async_handler_once_per_event(
    client: httpx.AsyncClient, engine: Any, database_url: str
) -> None:
    user_id, auth = await sign_up(client, "grace")
    for title in ("one", "two"):
        r = await client.post("/items", json={"title": title}, headers=auth)
        assert r.status_code == 201, r.text
    # The app's own URL: postgresql+psycopg:// serves its async engine and the relay alike.
    run("outbox.relay", "--once", "--app", "fastapi_async.handlers",
        OUTBOX_DATABASE_URL=database_url)
    async with engine.connect() as conn:
        texts = (await conn.scalars(sa.text("SELECT text FROM activity WHERE user_id = :u"),
                                    {"u": user_id})).all()
    assert sorted(texts) == ["created item 'one'", "created item 'two'"]
    assert {e.status for e in await events(engine, user_id=str(user_id))} == {"completed"}
    # the handler's own writes are attributed to the user who caused them
    assert len(await events(engine, type="public.activity.create", user_id=str(user_id))) == 2


async def test_a_redelivered_event_has_no_second_effect(
    client: httpx.AsyncClient, engine: Any
) -> None:
    from fastapi_async.handlers import record_activity

    user_id, auth = await sign_up(client, "linus")
    r = await client.post("/items", json={"title": "once"}, headers=auth)
    assert r.status_code == 201, r.text
    (event,) = await events(engine, type="public.items.create", user_id=str(user_id))
    for _ in range(2):  # at-least-once delivery: the inbox row turns the second into a no-op
        await record_activity(event)
    async with engine.connect() as conn:
        count = (await conn.scalar(sa.text("SELECT count(*) FROM activity WHERE user_id = :u"),
                                   {"u": user_id}))
    assert count == 1


def test_the_models_and_the_migrations_agree(database_url: str) -> None:
    """`alembic check` after `alembic upgrade head`: the outbox's tables are in the chain and in
    target_metadata, so autogenerate proposes nothing."""
    done = run("alembic", "check", cwd=APP_DIR)
    assert "No new upgrade operations detected" in done.stdout + done.stderr

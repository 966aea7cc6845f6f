"""The example application against the trigger oracle of the repository's tests
(``tests/capture_oracle.py``): a PostgreSQL row trigger on each of the application's tables
logs every row change; after a few requests — sign-ups, items from sync and async endpoints, a
batch refused after its flush — every logged change has exactly one event with the stored
values (secrets left out as documented), and every event a logged change."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fastapi_app.tests.test_fastapi_app import sign_up
from tests import capture_oracle as oracle

pytestmark = pytest.mark.anyio

TABLES = ["user", "apitoken", "item", "activity"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(app: Any) -> Any:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c


async def test_every_row_change_of_the_application_has_its_event(
    client: httpx.AsyncClient, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi_app import main

    with engine.begin() as conn:
        oracle.install(conn, TABLES)
    try:
        for name in ("ada", "bob"):
            _, auth = await sign_up(client, name)
            for path in ("/items", "/items/async"):
                r = await client.post(path, json={"title": f"{name} {path}"}, headers=auth)
                assert r.status_code == 201, r.text
            r = await client.post("/items/batch", json=["a", "b"], headers=auth)
            assert r.status_code == 201, r.text
        monkeypatch.setattr(main, "MAX_ITEMS", 1)
        r = await client.post("/items/batch", json=["x", "y"], headers=auth)
        assert r.status_code == 409  # flushed, then rolled back: neither rows nor events
        with engine.connect() as conn:
            checked = oracle.check(
                conn, {t: ["id"] for t in TABLES},
                left_out={"user": {"hashed_password"}, "apitoken": {"token"}})
        assert checked == 2 * (1 + 1 + 2 + 2)  # per user: user, token, two items, a batch of 2
    finally:
        with engine.begin() as conn:
            oracle.uninstall(conn, TABLES)

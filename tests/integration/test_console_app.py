"""The console's ASGI app over HTTP (Starlette's test client), on PostgreSQL: sign-in, CSRF,
read-only, redaction, filters as data, replays, mounting."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

pytest.importorskip("starlette")
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient

from outbox.console import create_app
from outbox.console.views import FILTER_FIELDS
from outbox.events import Event
from outbox.exceptions import OutboxError
from tests.integration.ops_seed import INJECTIONS, add, count, event, statuses

TOKEN = "test-token-123"
USER, PASSWORD = "ops", "pass-word-123"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html"}


def failed(type: str = "public.orders.create", error: str = "boom", **kw: Any) -> Event:
    ev = event(type, status="failed", **kw)
    ev.error = error
    return ev


def client_for(app: Any, base: str = "http://127.0.0.1",
               peer: str = "127.0.0.1") -> TestClient:
    return TestClient(app, base_url=base, follow_redirects=False, client=(peer, 50000))


@pytest.fixture
def app(pg_engine: sa.Engine) -> Any:
    return create_app(pg_engine, token=TOKEN, username=USER, password=PASSWORD,
                      redact=["payload.password", "metadata.api_key"])


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with client_for(app) as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def signed_in(client: TestClient) -> TestClient:
    """Sign in through the form (session cookie) and return the client."""
    page = client.get("/login")
    r = client.post("/login", data={"csrf": csrf_of(page.text), "username": USER,
                                    "password": PASSWORD, "next": "/events"})
    assert r.status_code == 303 and r.headers["location"] == "/events"
    return client


# -- sign-in ------------------------------------------------------------------------------------


def test_every_page_needs_sign_in(client: TestClient) -> None:
    r = client.get("/events", headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fevents"
    for path in ("/events", "/failures", "/health", "/entity?entity=a&id=1"):
        r = client.get(path)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="outbox console"')
    assert client.post("/events/00000000-0000-0000-0000-000000000000/replay").status_code == 401
    assert client.get("/events", headers={"Authorization": "Bearer wrong-token"}).status_code \
        == 401
    bad_basic = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
    assert client.get("/events", headers={"Authorization": bad_basic}).status_code == 401
    assert client.get("/static/console.css").status_code == 200


def test_token_basic_and_session_sign_in(client: TestClient,
                                         caplog: pytest.LogCaptureFixture) -> None:
    assert client.get("/events", headers=BEARER).status_code == 200
    r = client.get("/events", headers=BASIC)
    assert r.status_code == 200 and '<span id="identity">ops</span>' in r.text
    page = client.get("/login")
    assert page.status_code == 200 and "outbox_csrf" in client.cookies
    with caplog.at_level(logging.WARNING, "outbox.console"):
        r = client.post("/login", data={"csrf": csrf_of(page.text), "username": USER,
                                        "password": "wrong"})
    assert r.status_code == 401 and "wrong credentials" in r.text
    assert "failed sign-in as 'ops'" in caplog.text and "wrong" not in caplog.text.split(
        "failed sign-in")[1].split("\n")[0].replace("wrong credentials", "")
    r = client.post("/login", data={"csrf": csrf_of(page.text), "token": TOKEN,
                                    "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    assert "outbox_session" in r.cookies
    assert client.get("/events").status_code == 200
    page = client.get("/events")
    r = client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    assert client.get("/events").status_code == 401


def test_sign_in_needs_the_csrf_token(client: TestClient) -> None:
    client.get("/login")
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 403 and "CSRF" in r.text
    assert "outbox_session" not in r.cookies


def test_refuses_to_start_without_credentials(pg_engine: sa.Engine) -> None:
    with pytest.raises(OutboxError, match="no credentials configured"):
        create_app(pg_engine)
    with pytest.raises(OutboxError, match="choose one"):
        create_app(pg_engine, token=TOKEN, no_auth=True)
    with pytest.raises(ValueError, match="both username and password"):
        create_app(pg_engine, username="ops")


def test_without_sign_in_only_loopback_host_names(pg_engine: sa.Engine) -> None:
    app = create_app(pg_engine, no_auth=True)
    with client_for(app) as c:
        r = c.get("/events")
        assert r.status_code == 200 and '<span id="identity">anonymous</span>' in r.text
        assert "sign out" not in r.text
    with client_for(app, "http://localhost:8765") as c:
        assert c.get("/events").status_code == 200
    with client_for(app, "http://attacker.example") as c:  # DNS rebinding
        assert c.get("/events").status_code == 421
    with client_for(app, peer="203.0.113.9") as c:  # a remote client naming 127.0.0.1 as Host
        r = c.get("/events", headers={"Host": "127.0.0.1"})
        assert r.status_code == 421 and "anonymous" not in r.text


def test_the_applications_own_sign_in(pg_engine: sa.Engine,
                                      caplog: pytest.LogCaptureFixture) -> None:
    ev = add(pg_engine, [failed()])[0]

    async def authenticate(request: Request) -> str | None:
        return request.headers.get("x-user")

    app = create_app(pg_engine, authenticate=authenticate)
    with client_for(app) as c:
        assert c.get("/events", headers=HTML).status_code == 401
        page = c.get(f"/events/{ev.id}", headers={"x-user": "alice"})
        assert page.status_code == 200 and "alice" in page.text
        with caplog.at_level(logging.WARNING, "outbox.console"):
            r = c.post(f"/events/{ev.id}/replay", headers={"x-user": "alice"},
                       data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303
    assert statuses(pg_engine)[ev.id] == "pending"
    assert f"alice from 127.0.0.1 replayed event {ev.id}" in caplog.text


# -- actions --------------------------------------------------------------------------------------


def test_replaying_one_event_needs_csrf_and_is_logged(client: TestClient, pg_engine: sa.Engine,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ev = add(pg_engine, [failed()])[0]
    page = client.get(f"/events/{ev.id}", headers=BASIC)
    assert 'id="replay"' in page.text
    url = f"/events/{ev.id}/replay"
    assert client.post(url, headers=BASIC).status_code == 415  # not even a form
    assert client.post(url, headers=BASIC, data={"other": "x"}).status_code == 403
    assert client.post(url, headers=BASIC, data={"csrf": "forged"}).status_code == 403
    other = client_for(client.app)  # another browser: its own CSRF cookie
    assert other.post(url, headers=BASIC, data={"csrf": csrf_of(page.text)}).status_code == 403
    assert statuses(pg_engine)[ev.id] == "failed"
    with caplog.at_level(logging.WARNING, "outbox.console"):
        r = client.post(url, headers=BASIC, data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"].startswith(f"/events/{ev.id}?done=")
    assert statuses(pg_engine)[ev.id] == "pending"
    assert f"ops from 127.0.0.1 replayed event {ev.id}" in caplog.text
    again = client.post(url, headers=BASIC, data={"csrf": csrf_of(page.text)})
    shown = client.get(again.headers["location"], headers=BASIC)
    assert "not replayed: the event is pending, not failed" in shown.text


def test_replay_every_failed_event_matching_a_filter(client: TestClient,
                                                     pg_engine: sa.Engine) -> None:
    hits = add(pg_engine, [failed("public.orders.create"), failed("public.orders.update")])
    miss = add(pg_engine, [failed("public.users.create"),
                           event("public.orders.create", status="completed")])
    page = client.get("/events?status=failed&type=public.orders.*", headers=BASIC)
    assert 'id="replay-matching"' in page.text
    fields = {"csrf": csrf_of(page.text), "status": "failed", "type": "public.orders.*"}
    preview = client.post("/replay", headers=BASIC, data=fields)
    assert preview.status_code == 200 and '<b id="count">2</b>' in preview.text
    assert {statuses(pg_engine)[e.id] for e in hits} == {"failed"}
    done = client.post("/replay", headers=BASIC, data={**fields, "confirm": "yes"})
    assert "Replayed 2 events" in done.text
    now = statuses(pg_engine)
    assert {now[e.id] for e in hits} == {"pending"}
    assert [now[e.id] for e in miss] == ["failed", "completed"]
    r = client.post("/replay", headers=BASIC, data={**fields, "status": ""})
    assert r.status_code == 400 and "failed events only" in r.text


def test_replay_a_failure_group_after_a_preview(client: TestClient, pg_engine: sa.Engine) -> None:
    group = add(pg_engine, [failed(error="KeyError: 'sku'") for _ in range(3)])
    other = add(pg_engine, [failed(error="TimeoutError")])[0]
    page = client.get("/failures", headers=BASIC)
    assert re.search(r'<td class="num">3</td>\s*<td class="type">', page.text)
    fields = {"csrf": csrf_of(page.text), "type": "public.orders.create",
              "error": "KeyError: 'sku'"}
    preview = client.post("/failures/replay", headers=BASIC, data=fields)
    assert '<b id="count">3</b>' in preview.text
    done = client.post("/failures/replay", headers=BASIC, data={**fields, "confirm": "yes"})
    assert "Replayed 3 events" in done.text
    now = statuses(pg_engine)
    assert {now[e.id] for e in group} == {"pending"} and now[other.id] == "failed"


def test_read_only_shows_no_action_and_refuses_them(pg_engine: sa.Engine) -> None:
    ev = add(pg_engine, [failed()])[0]
    app = create_app(pg_engine, token=TOKEN, read_only=True)
    with client_for(app) as c:
        page = c.get(f"/events/{ev.id}", headers=BEARER)
        assert 'id="replay"' not in page.text and "read-only" in page.text
        assert "replay…" not in c.get("/failures", headers=BEARER).text
        r = c.post(f"/events/{ev.id}/replay", headers=BEARER, data={"csrf": csrf_of(page.text)})
        assert r.status_code == 403 and "read-only" in r.text
    assert statuses(pg_engine)[ev.id] == "failed"


# -- what pages show ------------------------------------------------------------------------------


def test_redacted_paths_never_reach_the_page(client: TestClient, pg_engine: sa.Engine) -> None:
    row = dict(schema_name="public", entity="users", entity_id="7")
    created = event("public.users.create", operation="create",
                    payload={"email": "a@example.com", "password": "hunter2-secret"},
                    metadata={"api_key": "k-123-secret"}, **row)
    updated = event("public.users.update", operation="update",
                    payload={"email": "b@example.com", "password": "new-secret-2"},
                    metadata={"changes": {"password": {"old": "hunter2-secret",
                                                       "new": "new-secret-2"},
                                          "email": {"old": "a@example.com",
                                                    "new": "b@example.com"}}}, **row)
    add(pg_engine, [created, updated])
    pages = [client.get(f"/events/{created.id}", headers=BASIC).text,
             client.get(f"/events/{updated.id}", headers=BASIC).text,
             client.get("/entity?entity=users&id=7&schema=public", headers=BASIC).text]
    for html in pages:
        assert "secret" not in html
        assert "***" in html
    assert "b@example.com" in pages[2] and "a@example.com" in pages[2]


def test_markup_in_events_is_escaped(client: TestClient, pg_engine: sa.Engine) -> None:
    ev = failed("x.y", error="<script>alert(1)</script>", user_id="<b>u</b>",
                payload={"html": "<img src=x onerror=alert(1)>"})
    add(pg_engine, [ev])
    for path in (f"/events/{ev.id}", "/events", "/failures"):
        html = client.get(path, headers=BASIC).text
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>u</b>" not in html
        assert "&lt;script&gt;" in html
    headers = client.get("/events", headers=BASIC).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_filters_pages_and_their_errors(client: TestClient, pg_engine: sa.Engine) -> None:
    add(pg_engine, [event("public.users.create", user_id="u1", status="completed",
                          age=dt.timedelta(minutes=i)) for i in range(5)])
    add(pg_engine, [event("public.orders.create", user_id="u2", status="completed")])
    r = client.get("/events?type=public.users.*&user_id=u1&since=1h", headers=BASIC)
    assert r.status_code == 200 and r.text.count("public.users.create</td>") == 5
    assert "public.orders.create</td>" not in r.text
    for query, message in [("type=a..b", "type:"), ("status=lost", "status: must be one of"),
                           ("since=yesterday", "since: invalid time"),
                           ("before=nonsense", "invalid page cursor")]:
        r = client.get(f"/events?{query}", headers=BASIC)
        assert r.status_code == 400 and message in r.text, query
    assert client.get("/events/not-a-uuid", headers=BASIC).status_code == 404
    assert client.get("/events/00000000-0000-0000-0000-000000000000",
                      headers=BASIC).status_code == 404
    assert client.get("/entity?entity=users", headers=BASIC).status_code == 400


def test_keyset_pages_over_http(pg_engine: sa.Engine) -> None:
    add(pg_engine, [event("t.page", status="completed", age=dt.timedelta(seconds=i))
                    for i in range(7)])
    app = create_app(pg_engine, token=TOKEN, page_size=3)
    seen: list[str] = []
    with client_for(app) as c:
        url: str | None = "/events?type=t.page"
        while url:
            html = c.get(url, headers=BEARER).text
            seen += re.findall(r'<td class="num">(\d+)</td>\s*<td><span class="status', html)
            found = re.search(r'<a id="older" href="([^"]+)"', html)
            url = found.group(1).replace("&amp;", "&") if found else None
    # age 0 was written first (lowest seq): newest first is seq order here
    assert len(seen) == 7 and seen == sorted(seen, key=int)


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_strings_in_every_filter_field_change_nothing(
        client: TestClient, pg_engine: sa.Engine, value: str) -> None:
    add(pg_engine, [event("public.users.create", user_id="u1", entity="users", entity_id="1",
                          status="completed")])
    for name, _, _ in FILTER_FIELDS:
        r = client.get("/events", params={name: value}, headers=BASIC)
        assert r.status_code in (200, 400), name
        assert "public.users.create</td>" not in r.text or r.status_code == 400, name
    for params in ({"entity": value, "id": value, "schema": value},
                   {"entity": "users", "id": value}):
        assert client.get("/entity", params=params, headers=BASIC).status_code == 200
    assert client.get("/events", params={"before": value}, headers=BASIC).status_code == 400
    page = client.get("/failures", headers=BASIC)
    r = client.post("/failures/replay", headers=BASIC,
                    data={"csrf": csrf_of(page.text), "type": value, "error": value,
                          "confirm": "yes"})
    assert r.status_code == 404 and "no such failure group" in r.text
    assert count(pg_engine) == 1
    with pg_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one() == 1


def test_health_and_failures_pages(client: TestClient, pg_engine: sa.Engine) -> None:
    add(pg_engine, [event("t.x", age=dt.timedelta(seconds=300)),
                    failed(ordering_key="public.orders:1"),
                    event("public.orders.create", ordering_key="public.orders:1")])
    html = client.get("/health", headers=BASIC).text
    assert re.search(r'<b id="lag">(4|5) min</b>', html), html
    assert '<b id="pending">2</b>' in html and '<b id="failed">' in html
    assert 'data-refresh="/health?live=1"' in html and "<svg" in html
    live = client.get("/health?live=1", headers=BASIC).text
    assert live.lstrip().startswith('<section class="cards">')
    failures = client.get("/failures", headers=BASIC).text
    assert "<code>public.orders:1</code>" in failures


def test_mounted_under_a_prefix(pg_engine: sa.Engine) -> None:
    ev = add(pg_engine, [failed()])[0]
    console = create_app(pg_engine, token=TOKEN)
    host = Starlette(routes=[Mount("/outbox", app=console)])
    with client_for(host) as c:
        r = c.get("/outbox/events", headers=HTML)
        assert r.headers["location"] == "/outbox/login?next=%2Foutbox%2Fevents"
        login = c.get("/outbox/login")
        assert 'action="/outbox/login"' in login.text
        assert 'href="/outbox/static/console.css"' in login.text
        assert c.cookies.jar and all(ck.path == "/outbox" for ck in c.cookies.jar)
        r = c.post("/outbox/login", data={"csrf": csrf_of(login.text), "token": TOKEN,
                                          "next": "/outbox/events"})
        assert r.status_code == 303 and r.headers["location"] == "/outbox/events"
        page = c.get("/outbox/events")
        assert page.status_code == 200 and f'href="/outbox/events/{ev.id}"' in page.text
        assert c.get("/outbox/static/console.js").status_code == 200
        event_page = c.get(f"/outbox/events/{ev.id}")
        r = c.post(f"/outbox/events/{ev.id}/replay", data={"csrf": csrf_of(event_page.text)})
        assert r.status_code == 303 and r.headers["location"].startswith(f"/outbox/events/{ev.id}")
    assert statuses(pg_engine)[ev.id] == "pending"


def test_a_database_that_went_away_is_one_line(pg_url: str) -> None:
    engine = sa.create_engine(pg_url.rsplit("/", 1)[0] + "/no_such_database_here")
    app = create_app(engine, token=TOKEN)
    with client_for(app) as c:
        r = c.get("/events", headers=BEARER)
    assert r.status_code == 503 and "database:" in r.text and "Traceback" not in r.text
    engine.dispose()


def test_a_query_over_the_time_limit_is_cancelled_with_advice(pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:  # 100,000 rows, none from source 'system'
        conn.exec_driver_sql(
            "INSERT INTO events (id, source, type, status, payload, instance_id, created_at, "
            "metadata, retry_count, next_attempt_at) SELECT gen_random_uuid(), 'database', "
            "'t.x', 'completed', '{}', 'i', now(), '{}', 0, now() "
            "FROM generate_series(1, 100000)")
    app = create_app(pg_engine, token=TOKEN, query_timeout=0.001)
    with client_for(app) as c:
        r = c.get("/events?source=system", headers=BEARER)
    assert r.status_code == 504 and "narrow the filter" in r.text

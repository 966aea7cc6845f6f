"""The console under hostile input and careless operators: group replay of multi-line errors,
secrets echoed in errors, password guessing, spoofed Host headers, deep payloads, invisible
characters, sign-out, secrets with a trailing line break, and no 500 for any parameter."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import urllib.parse
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from outbox.console import create_app
from tests.integration.ops_seed import add, event, statuses
from tests.integration.test_console_app import (
    BASIC,
    BEARER,
    PASSWORD,
    TOKEN,
    USER,
    client_for,
    csrf_of,
    failed,
    signed_in,
)

CARD = "4111111111111111"


def hidden_fields(html: str, form_action: str) -> dict[str, str]:
    """The hidden inputs of the first form posting to ``form_action``, as a browser sends
    them: line breaks in values become CRLF (the HTML form submission rules)."""
    start = html.index(f'action="{form_action}"')
    form = html[start:html.index("</form>", start)]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    return {k: _unescape(v).replace("\r\n", "\n").replace("\n", "\r\n")
            for k, v in fields.items()}


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_a_multi_line_error_group_replays_as_the_browser_sends_it(
        pg_engine: sa.Engine) -> None:
    trace = "Traceback (most recent call last):\n  File \"h.py\", line 3\nKeyError: 'sku'"
    group = add(pg_engine, [failed(error=trace) for _ in range(3)])
    other = add(pg_engine, [failed(error="KeyError")])[0]
    app = create_app(pg_engine, token=TOKEN)
    with client_for(app) as client:
        page = client.get("/failures", headers=BEARER)
        fields = hidden_fields(page.text, "/failures/replay")
        assert "group" in fields and "error" not in fields  # the form names the group, no text
        preview = client.post("/failures/replay", headers=BEARER, data=fields)
        assert '<b id="count">3</b>' in preview.text, preview.text
        confirm = hidden_fields(preview.text, "/failures/replay")
        done = client.post("/failures/replay", headers=BEARER, data=confirm)
        assert "Replayed 3 events" in done.text
        # scripts that name the error text: CRLF line breaks match the stored LF error too
        add(pg_engine, [failed(error=trace)])
        page = client.get("/failures", headers=BEARER)
        legacy = {"csrf": csrf_of(page.text), "type": "public.orders.create",
                  "error": trace.replace("\n", "\r\n")}
        assert '<b id="count">1</b>' in client.post("/failures/replay", headers=BEARER,
                                                    data=legacy).text
    now = statuses(pg_engine)
    assert {now[e.id] for e in group} == {"pending"} and now[other.id] == "failed"


def test_hidden_values_are_masked_in_errors_on_every_page(pg_engine: sa.Engine) -> None:
    """A handler's error that echoes a redacted value shows *** on the trail, the failures
    groups and blocked keys, the replay confirmation and the event page; keys match in any
    case and ``**`` reaches any depth."""
    ev = failed(error=f"ValueError: card {CARD} declined for s3cr3t-pw",
                payload={"Card": {"Number": CARD}, "user": {"profile": {"PASSWORD": "s3cr3t-pw"}}},
                ordering_key="public.orders:9")
    add(pg_engine, [ev])
    app = create_app(pg_engine, token=TOKEN,
                     redact=["payload.card.number", "payload.**.password"])
    with client_for(app) as client:
        pages = [client.get("/events", params={"status": "failed"}, headers=BEARER),
                 client.get("/failures", headers=BEARER),
                 client.get(f"/events/{ev.id}", headers=BEARER),
                 client.get("/entity", params={"entity": "orders", "id": "9"}, headers=BEARER)]
        fields = hidden_fields(pages[1].text, "/failures/replay")
        pages.append(client.post("/failures/replay", headers=BEARER, data=fields))
        for page in pages:
            assert page.status_code == 200, page.text
            assert CARD not in page.text and "s3cr3t-pw" not in page.text, page.url
        assert "card *** declined for ***" in pages[2].text
        assert "card *** declined" in pages[1].text and "card *** declined" in pages[0].text


def test_password_guessing_is_throttled_and_logged(pg_engine: sa.Engine,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(pg_engine, token=TOKEN, username=USER, password=PASSWORD)
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{USER}:guess".encode()).decode()}
    with client_for(app) as client, caplog.at_level(logging.WARNING, "outbox.console"):
        for _ in range(10):
            assert client.get("/events", headers=wrong).status_code == 401
        refused = client.get("/events", headers=wrong)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        # the address is refused, whatever it tries, until the window passes
        assert client.get("/events", headers=BASIC).status_code == 429
        page = client.get("/login")
        assert client.post("/login", data={"csrf": csrf_of(page.text), "token": TOKEN}
                           ).status_code == 429
    with client_for(app, peer="127.0.0.2") as other:  # another address is not affected
        assert other.get("/events", headers=BASIC).status_code == 200
    failures = [r for r in caplog.records if "failed sign-in as 'ops' from 127.0.0.1" in
                r.getMessage()]
    assert len(failures) == 10 and "(10 in the last 60 s)" in failures[-1].getMessage()
    assert "guess" not in caplog.text


def test_a_payload_nested_1000_deep_shows_a_notice_not_a_500(pg_engine: sa.Engine) -> None:
    ev = event("public.orders.create", entity="orders", entity_id="7", operation="create",
               status="completed")
    add(pg_engine, [ev])
    deep = "[" * 1000 + "]" * 1000
    with pg_engine.begin() as conn:
        conn.execute(sa.text("UPDATE events SET payload = CAST(:p AS jsonb), "
                             "metadata = CAST(:m AS jsonb) WHERE id = :id"),
                     {"p": deep, "m": "{}", "id": ev.id})
    app = create_app(pg_engine, token=TOKEN, redact=["payload.password"])
    with client_for(app) as client:
        for path, params in ((f"/events/{ev.id}", {}),
                             ("/entity", {"entity": "orders", "id": "7"})):
            r = client.get(path, params=params, headers=BEARER)
            assert r.status_code == 200 and "nested deeper than" in r.text, r.text[-500:]


def test_pages_show_invisible_characters_and_only_their_own_notices(
        pg_engine: sa.Engine) -> None:
    ev = add(pg_engine, [event("public.users.create", user_id="\u202eadmin")])[0]
    app = create_app(pg_engine, token=TOKEN)
    with client_for(app) as client:
        page = client.get(f"/events/{ev.id}", headers=BEARER,
                          params={"done": "Your account is locked: call +1 555 0100"})
        assert page.status_code == 200
        assert "\u202e" not in page.text and "\\u202eadmin" in page.text
        assert "call +1 555" not in page.text
        page = client.get(f"/events/{ev.id}", headers=BEARER, params={"done": "replayed"})
        assert "replayed: pending again" in page.text


def test_sign_out_and_a_credential_change_end_the_session(pg_engine: sa.Engine) -> None:
    app = create_app(pg_engine, username=USER, password=PASSWORD, secret="s" * 32)
    with client_for(app) as client:
        signed_in(client)
        cookie = client.cookies["outbox_session"]
        assert client.get("/events").status_code == 200
        page = client.get("/events")
        client.post("/logout", data={"csrf": csrf_of(page.text)})
    with client_for(app) as replayed:  # the copied cookie after sign-out
        replayed.cookies.set("outbox_session", cookie)
        assert replayed.get("/events").status_code == 401
    with client_for(app) as client:
        signed_in(client)
        cookie = client.cookies["outbox_session"]
    changed = create_app(pg_engine, username=USER, password="a-new-password", secret="s" * 32)
    same = create_app(pg_engine, username=USER, password=PASSWORD, secret="s" * 32)
    for other, status in ((changed, 401), (same, 200)):
        with client_for(other) as client:
            client.cookies.set("outbox_session", cookie)
            assert client.get("/events").status_code == status


def test_a_secret_with_a_trailing_line_break_signs_in(pg_engine: sa.Engine) -> None:
    app = create_app(pg_engine, token=TOKEN + "\n", username=USER, password=PASSWORD + "\r\n")
    with client_for(app) as client:
        assert client.get("/events", headers=BEARER).status_code == 200
        assert client.get("/events", headers=BASIC).status_code == 200


HOSTILE = ["1000000d", "99999999999999999999", str(2**63), str(-(2**63) - 1), "x\x00y",
           "9" * 400, "2026-13-45T25:61Z", "-1", "1e309", "nan", "../../etc",
           "\u202e", "0:0", "9999999999999999999:" + str(uuid.uuid4())]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_no_parameter_gives_a_500(client_app: TestClient, value: str) -> None:
    params: list[dict[str, Any]] = [{n: value} for n in (
        "type", "status", "user_id", "session_id", "entity", "entity_id", "since", "until",
        "before", "after", "schema_name", "operation", "source", "instance_id")]
    for p in params:
        r = client_app.get("/events", params=p, headers=BEARER)
        assert r.status_code < 500, (p, r.status_code, r.text[-300:])
    for p in ({"entity": value, "id": value}, {"entity": "orders", "id": "1", "before": value},
              {"entity": "orders", "id": "1", "schema": value}):
        r = client_app.get("/entity", params=p, headers=BEARER)
        assert r.status_code < 500, (p, r.status_code)
    for path in (f"/events/{urllib.parse.quote(value, safe='')}", "/health", "/failures"):
        r = client_app.get(path, params={"done": value, "live": value}, headers=BEARER)
        assert r.status_code < 500, (path, r.status_code)


@pytest.fixture
def client_app(pg_engine: sa.Engine) -> Any:
    add(pg_engine, [event("public.orders.create", entity="orders", entity_id="1",
                          age=dt.timedelta(minutes=5)), failed()])
    with client_for(create_app(pg_engine, token=TOKEN)) as client:
        yield client


def test_slow_type_suggestions_never_fail_the_trail(pg_engine: sa.Engine,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The suggestions are a decoration: cancelled at their own budget, the page is served
    with the last list (or none), and the refresh is not retried on every request."""
    from outbox._sql import console as console_sql

    add(pg_engine, [event("public.orders.create")])
    calls: list[int] = []
    real = console_sql.known_types

    def slow(conn: sa.Connection, limit: int = 200) -> list[str]:
        calls.append(1)
        if len(calls) > 1:
            conn.execute(sa.text("SELECT pg_sleep(5)"))  # past the 1 s budget
        return real(conn, limit)

    monkeypatch.setattr(console_sql, "known_types", slow)
    monkeypatch.setattr("outbox.console.app.TYPES_TTL", 0.0)
    app = create_app(pg_engine, token=TOKEN)
    with client_for(app) as client, caplog.at_level(logging.WARNING, "outbox.console"):
        first = client.get("/events", headers=BEARER)
        assert first.status_code == 200 and "public.orders.create" in first.text
        second = client.get("/events", headers=BEARER, params={"status": "pending"})
        assert second.status_code == 200 and "public.orders.create" in second.text
    assert "type suggestions not refreshed" in caplog.text and len(calls) == 2


def test_a_locked_table_gets_503_or_504_never_500(pg_engine: sa.Engine) -> None:
    """50 parallel requests while ``events`` is locked: each answered within the budget with
    503 (waiting for one of the console's few connections) or 504 (its query cancelled); the
    console holds at most MAX_CONNECTIONS connections and serves normally afterwards."""
    import concurrent.futures

    from outbox.console.app import MAX_CONNECTIONS

    add(pg_engine, [event("public.orders.create")])
    app = create_app(pg_engine, token=TOKEN, query_timeout=1.0)
    held, peak = [0], [0]

    def checkout(*_: Any) -> None:
        held[0] += 1
        peak[0] = max(peak[0], held[0])

    def checkin(*_: Any) -> None:
        held[0] -= 1

    sa.event.listen(pg_engine, "checkout", checkout)
    sa.event.listen(pg_engine, "checkin", checkin)
    locker = pg_engine.connect()
    tx = locker.begin()
    locker.execute(sa.text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
    try:
        with client_for(app) as client:
            def get(i: int) -> int:
                path = ("/events", "/failures", "/health", "/entity?entity=a&id=1")[i % 4]
                return client.get(path, headers=BEARER).status_code

            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                codes = list(pool.map(get, range(50)))
            assert set(codes) <= {503, 504}, codes
            assert 504 in codes and 503 in codes
            assert peak[0] <= MAX_CONNECTIONS + 1, peak  # + the locker
    finally:
        tx.rollback()
        locker.close()
    with client_for(app) as client:
        assert client.get("/events", headers=BEARER).status_code == 200

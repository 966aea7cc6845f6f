"""The console in a real headless browser (Debian's chromium driven by Playwright): a user signs
in, filters the trail, opens an entity's timeline, replays failed events that a running relay
then completes, is refused without credentials or CSRF token, and watches the lag change.

The browser is never downloaded: Playwright drives ``/usr/bin/chromium`` (``.ci/run`` installs
``chromium`` when it is missing). Without it the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from outbox.events import Event, new_event_id, utcnow
from tests import servers
from tests.acceptance.console_server import (
    ConsoleProcess,
    console,
    console_env,
    outbox_database,
    wait_until,
)
from tests.integration.ops_seed import add, event

USER, PASSWORD = "ops", "browser-pass-77"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _missing(what: str) -> None:
    message = f"{what} (apt-get install chromium; pip install '.[test]')"
    if servers.IN_CI:
        pytest.fail(f"{message}: CI is set, a missing browser fails the run")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no chromium at {CHROMIUM}")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with outbox_database() as url:
        yield url


@pytest.fixture(scope="module")
def engine(db: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def site(db: str) -> Iterator[ConsoleProcess]:
    env = {"OUTBOX_CONSOLE_USERNAME": USER, "OUTBOX_CONSOLE_PASSWORD": PASSWORD,
           "OUTBOX_CONSOLE_REDACT": "payload.password"}
    with console("--database-url", db, "console", "--port", "0", env=env) as c:
        yield c


@pytest.fixture
def page(browser: Any, site: ConsoleProcess) -> Iterator[Any]:
    """A fresh browser context (no cookies), signed in through the form."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    p = context.new_page()
    p.goto(site.url + "/events")
    assert "/login" in p.url
    p.fill("input[name=username]", USER)
    p.fill("input[name=password]", PASSWORD)
    p.click("button[type=submit]")
    p.wait_for_url(site.url + "/events")
    yield p
    context.close()


def failed(type: str, error: str, **kw: Any) -> Event:
    ev = event(type, status="failed", **kw)
    ev.error = error
    return ev


def status_of(engine: sa.Engine, event_id: object) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT status FROM events WHERE id = :i"),
                                {"i": event_id}).scalar_one())


def test_filter_the_trail_and_open_an_entity_timeline(page: Any, site: ConsoleProcess,
                                                      engine: sa.Engine) -> None:
    row = dict(schema_name="public", entity="users", entity_id="501", status="completed")
    add(engine, [
        event("public.users.create", operation="create", age=dt.timedelta(minutes=3),
              payload={"name": "ada", "password": "pw-first-secret"}, **row),
        event("public.users.update", operation="update", age=dt.timedelta(minutes=2),
              metadata={"changes": {"name": {"old": "ada", "new": "grace"}}}, **row),
        event("public.users.update", operation="update", age=dt.timedelta(minutes=1),
              metadata={"changes": {"password": {"old": "pw-first-secret",
                                                 "new": "pw-second-secret"}}}, **row),
        event("public.users.create", operation="create", schema_name="public",
              entity="users", entity_id="502", status="completed"),
        event("public.orders.create", entity="orders", entity_id="501", status="completed"),
    ])
    page.fill("input[name=type]", "public.users.*")
    page.fill("input[name=entity_id]", "501")
    page.click("#filters button[type=submit]")
    rows = page.locator("#events tbody tr")
    rows.first.wait_for()
    assert rows.count() == 3
    assert page.locator("#events td.type").all_inner_texts() == [
        "public.users.update", "public.users.update", "public.users.create"]
    assert page.url == site.url + "/events?type=public.users.*&entity_id=501"  # no empty fields

    page.locator("#events a.entity").first.click()
    page.wait_for_url("**/entity?*")
    timeline = page.locator("#timeline > li")
    assert timeline.count() == 3
    update = timeline.nth(1)
    assert update.locator("td.old").inner_text() == '"ada"'
    assert update.locator("td.new").inner_text() == '"grace"'
    text = page.locator("#timeline").inner_text()
    assert "secret" not in text and "***" in text  # redacted: payload.password


def test_replay_failed_events_and_see_a_running_relay_complete_them(
        page: Any, site: ConsoleProcess, db: str, engine: sa.Engine) -> None:
    one = add(engine, [failed("shop.order.create", "handler: ConnectionError: smtp down")])[0]
    group = add(engine, [failed("shop.invoice.create", "handler: KeyError: 'vat'")
                         for _ in range(2)])
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.relay", "--database-url", db, "--poll-interval", "0.2"],
        env=console_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        page.goto(f"{site.url}/events/{one.id}")
        assert page.locator("h1 .status").inner_text() == "failed"
        page.click("#replay")
        assert "replayed" in page.locator("#notice").inner_text()

        def completed() -> bool:
            page.reload()
            return bool(page.locator("h1 .status").inner_text() == "completed")

        assert wait_until(completed), "the relay did not complete the replayed event"
        assert page.locator("#attempts").inner_text().startswith("0 retries")

        page.goto(site.url + "/failures")
        row = page.locator("#groups tbody tr", has_text="shop.invoice.create")
        assert row.locator("td.num").inner_text() == "2"
        row.locator("button").click()
        assert page.locator("#count").inner_text() == "2"  # the preview, before anything moves
        assert {status_of(engine, e.id) for e in group} == {"failed"}
        page.click("#confirm-replay")
        assert page.locator("#done").inner_text() == "Replayed 2 events"
        assert wait_until(lambda: {status_of(engine, e.id) for e in group} == {"completed"})
    finally:
        relay.terminate()
        _, err = relay.communicate(timeout=20)
    assert relay.returncode == 0, err


def test_actions_need_credentials_and_the_csrf_token(browser: Any, page: Any,
                                                     site: ConsoleProcess,
                                                     engine: sa.Engine) -> None:
    ev = add(engine, [failed("shop.refund.create", "boom")])[0]
    replay = f"{site.url}/events/{ev.id}/replay"

    stranger = browser.new_context()
    try:
        r = stranger.request.post(replay, form={"csrf": "x"}, max_redirects=0)
        assert r.status == 401
        visit = stranger.new_page()
        visit.goto(f"{site.url}/events/{ev.id}")
        assert "/login" in visit.url and "replay" not in visit.content()
    finally:
        stranger.close()

    page.goto(f"{site.url}/events/{ev.id}")
    page.evaluate("document.querySelector('form.bulk input[name=csrf]').remove()")
    page.click("#replay")
    assert "CSRF" in page.locator("#error").inner_text()
    page.goto(f"{site.url}/events/{ev.id}")
    page.evaluate("document.querySelector('form.bulk input[name=csrf]').value = 'forged'")
    page.click("#replay")
    assert "CSRF" in page.locator("#error").inner_text()
    # A signed-in browser posting from outside the console's pages carries no token either.
    r = page.context.request.post(replay, form={}, max_redirects=0)
    assert r.status == 403
    assert status_of(engine, ev.id) == "failed"


def test_the_lag_figure_changes_when_events_pile_up(page: Any, site: ConsoleProcess,
                                                    engine: sa.Engine) -> None:
    page.goto(site.url + "/health")
    before_pending = int(page.locator("#pending").inner_text())
    before_lag = page.locator("#lag").inner_text()
    with engine.begin() as conn:  # 200 events written two minutes ago, not delivered
        created = utcnow() - dt.timedelta(minutes=2)
        conn.execute(sa.insert(Event), [
            {"id": new_event_id(), "source": "system", "type": "shop.pile.create",
             "status": "pending", "payload": {"n": i}, "metadata": {}, "instance_id": "t",
             "created_at": created, "next_attempt_at": created, "retry_count": 0}
            for i in range(200)])

    def refreshed() -> bool:  # no reload: the page refreshes its figures itself
        return bool(page.locator("#pending").inner_text() == str(before_pending + 200))

    assert wait_until(refreshed, timeout=15), "the health page did not refresh"
    lag = page.locator("#lag").inner_text()
    assert lag != before_lag and lag in ("120 s", "2 min"), lag


def test_a_hidden_health_tab_does_not_refresh(page: Any, site: ConsoleProcess) -> None:
    """A background tab costs the database nothing: no refresh while hidden, one at once when
    shown again."""
    page.goto(site.url + "/health")
    live: list[str] = []
    page.on("request", lambda r: live.append(r.url) if "live=1" in r.url else None)
    page.evaluate("""() => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => true});
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.wait_for_timeout(11_000)  # two refresh intervals (5 s)
    hidden = len(live)
    page.evaluate("""() => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => false});
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    assert wait_until(lambda: len(live) > hidden, timeout=3), "no refresh when shown again"
    assert hidden <= 1, f"{hidden} refreshes while hidden"  # one may have been under way

"""The ``outbox.testing`` pytest plugin, used the way an application's test suite uses it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

pytest_plugins = ["pytester"]

APP = '''
import outbox

seen = []


@outbox.subscribe("shop.orders.*")
def on_order(event):
    seen.append(event.payload["n"])


async def place_order(n):
    await outbox.publish(outbox.new_event("system", "shop.orders.placed", {"n": n, "total": 9}))
'''


@pytest.fixture
def app(pytester: pytest.Pytester) -> Iterator[pytest.Pytester]:
    from outbox.broker import default

    pytester.makepyfile(shopapp=APP)
    pytester.syspathinsert()
    saved = default._snapshot()  # the inner run shares this process's default broker
    # Start the inner suite as a fresh application process would: no default broker and no
    # handlers registered by modules other tests of this run imported.
    default._restore((None, {}))
    yield pytester
    default._restore(saved)


def test_broker_and_recorder_fixtures_in_an_app_suite(app: pytest.Pytester) -> None:
    app.makepyfile(test_app='''
        import pytest
        import outbox
        import shopapp

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        async def test_emits_and_handles(outbox_broker, outbox_recorder):
            assert outbox.get_default_broker() is outbox_broker
            await shopapp.place_order(1)
            await outbox_broker.join()
            assert shopapp.seen == [1]  # the app's import-time handler ran
            outbox_recorder.assert_emitted("shop.orders.*", payload={"n": 1}, count=1,
                                           source="system")
            outbox_recorder.assert_not_emitted("shop.refunds.>")

        @pytest.mark.outbox(mode="sync", inherit_subscriptions=False)
        async def test_marker_options(outbox_broker, outbox_recorder):
            assert outbox_broker.mode == "sync" and outbox_broker.subscriptions() == []
            await shopapp.place_order(2)
            assert shopapp.seen == [1]
            outbox_recorder.assert_emitted(payload={"n": 2})

        async def test_block_records_only_inside(outbox_broker, outbox_recorder):
            await shopapp.place_order(3)
            with outbox_recorder.block() as emitted:
                await shopapp.place_order(4)
            emitted.assert_emitted(payload={"n": 4})
            emitted.assert_not_emitted(payload={"n": 3})
            assert [e.payload["n"] for e in outbox_recorder.events] == [3, 4]

        async def test_failing_assertion_explains(outbox_broker, outbox_recorder):
            await shopapp.place_order(5)
            outbox_recorder.assert_emitted("shop.orders.placed", payload={"n": 6})

        def test_default_broker_is_restored():
            broker = outbox.get_default_broker()
            assert not broker.running
            assert [s.name for s in broker.subscriptions()] == ["shopapp.on_order"]
    ''')
    result = app.runpytest("-p", "anyio", "-q")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines([
        "*no event emitted matching 'shop.orders.placed', payload ⊇ {'n': 6}; "
        "emitted: shop.orders.placed {'n': 5, 'total': 9}*",
    ])


def test_recorder_watches_the_events_table(app: pytest.Pytester) -> None:
    app.makepyfile(test_table='''
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        import outbox

        def test_committed_events(tmp_path, outbox_recorder):
            engine = sa.create_engine(f"sqlite:///{tmp_path}/app.db")
            outbox.create_schema(engine)
            with Session(engine) as s, s.begin():
                s.add(outbox.new_event("system", "before", {}))
            outbox_recorder.watch(engine)
            with outbox_recorder.block() as emitted:
                with Session(engine) as s, s.begin():
                    s.add(outbox.new_event("system", "billing.invoice.sent", {"id": 7},
                                           user_id=3))
                with Session(engine) as s:
                    s.add(outbox.new_event("system", "rolled.back", {}))
                    s.rollback()
            e = emitted.assert_emitted("billing.>", payload={"id": 7}, user_id=3)
            assert e.seq is not None
            emitted.assert_not_emitted("rolled.back")
            emitted.assert_not_emitted("before")
            assert outbox_recorder.types == ["billing.invoice.sent"]

            with Session(engine) as s:  # a session sees its own uncommitted rows
                outbox_recorder.watch(s)
                s.add(outbox.new_event("system", "uncommitted", {}))
                s.flush()
                outbox_recorder.assert_emitted("uncommitted")
                s.rollback()
            engine.dispose()
    ''')
    result = app.runpytest("-q")
    result.assert_outcomes(passed=1)


def test_plugin_import_loads_no_optional_driver() -> None:
    code = textwrap.dedent("""
        import sys
        import outbox.testing
        heavy = [m for m in ("sqlalchemy", "redis", "nats", "psycopg", "anyio")
                 if m in sys.modules]
        print(",".join(heavy))
    """)
    # outbox/__init__ is imported by ``import outbox.testing``; the plugin itself adds nothing.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "redis" not in out.stdout and "nats" not in out.stdout and "psycopg" not in out.stdout

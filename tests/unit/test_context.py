"""``outbox.context`` blocks, request scopes and blocks that frameworks leave in another Context."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Iterator

import anyio
import pytest

import outbox
from outbox._context import EventContext, current_context, in_request_scope

ctx_module = sys.modules["outbox._context"]  # `outbox.context` on the package is the function


def user() -> str | None:
    return current_context().user_id


def test_blocks_nest_and_restore() -> None:
    assert current_context() == EventContext()
    with outbox.context(user_id=1, session_id="s", metadata={"a": 1}) as outer:
        assert (outer.user_id, outer.session_id, dict(outer.metadata)) == ("1", "s", {"a": 1})
        with outbox.context(user_id="2", metadata={"b": 2}) as inner:
            assert (inner.user_id, inner.session_id) == ("2", "s")
            assert dict(inner.metadata) == {"a": 1, "b": 2}
            assert current_context() == inner
        assert current_context() == outer
    assert user() is None


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(ctx_module, "_warned_foreign_exit", False)
    yield


def test_a_block_left_in_another_context_does_not_raise(
    fresh_warning: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What FastAPI does with a sync yield dependency: __enter__ and __exit__ each run in a
    fresh copy of the request's context."""
    block = outbox.context(user_id="7")
    contextvars.copy_context().run(block.__enter__)
    with caplog.at_level(logging.WARNING, logger="outbox.context"):
        contextvars.copy_context().run(block.__exit__, None, None, None)
        block2 = outbox.context(user_id="8")
        contextvars.copy_context().run(block2.__enter__)
        contextvars.copy_context().run(block2.__exit__, None, None, None)
    assert user() is None
    assert caplog.text.count("ContextMiddleware") == 1  # said once per process


def test_a_block_left_in_a_copy_of_its_context_restores_the_previous_value_there() -> None:
    def body() -> str:
        with outbox.context(user_id="outer"):
            block = outbox.context(user_id="inner")
            block.__enter__()
            copy = contextvars.copy_context()  # the block is current in the copy too
            copy.run(block.__exit__, None, None, None)  # its token is not the copy's
            return f"{copy.run(user)}/{user()}"

    # the copy is back to "outer"; this context still holds the block until it leaves it
    assert contextvars.copy_context().run(body) == "outer/inner"


def test_set_context_needs_a_request_scope() -> None:
    with pytest.raises(outbox.OutboxError, match=r"request scope.*ContextMiddleware"):
        outbox.set_context(user_id=1)


def test_request_scope_values_reach_every_copy_of_the_context() -> None:
    with outbox.request_scope(session_id="req-1"):
        assert in_request_scope()
        copy = contextvars.copy_context()  # e.g. the endpoint's worker thread, made early
        outbox.set_context(user_id=9)  # later: authentication
        assert copy.run(current_context) == EventContext(user_id="9", session_id="req-1")
        assert user() == "9"
    assert not in_request_scope()
    assert user() is None


def test_a_block_entered_on_a_worker_thread_is_seen_by_the_request_until_it_exits() -> None:
    seen: list[str | None] = []

    async def request() -> None:
        with outbox.request_scope():
            block = outbox.context(user_id="dep")
            await anyio.to_thread.run_sync(block.__enter__)  # a copy, on a worker thread
            seen.append(user())
            seen.append(await anyio.to_thread.run_sync(user))
            await anyio.to_thread.run_sync(block.__exit__, None, None, None)  # another copy
            seen.append(user())

    anyio.run(request)
    assert seen == ["dep", "dep", None]


def test_concurrent_tasks_of_one_request_keep_their_own_blocks() -> None:
    seen: dict[str, list[str | None]] = {"a": [], "b": []}

    async def task(name: str, started: anyio.Event, other: anyio.Event) -> None:
        with outbox.context(user_id=name):
            started.set()
            await other.wait()
            seen[name].append(user())

    async def request() -> None:
        with outbox.request_scope(user_id="base"):
            a, b = anyio.Event(), anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(task, "a", a, b)
                tg.start_soon(task, "b", b, a)
            assert user() == "base"

    anyio.run(request)
    assert seen == {"a": ["a"], "b": ["b"]}


def test_a_block_inside_the_scope_overrides_the_scope_and_a_block_outside_does_not() -> None:
    with outbox.context(user_id="outside", metadata={"svc": "api"}):
        with outbox.request_scope(metadata={"req": 1}):
            assert user() == "outside"
            outbox.set_context(user_id="authenticated")
            assert user() == "authenticated"
            with outbox.context(user_id="job", metadata={"step": 2}) as inner:
                assert inner.user_id == "job"
                assert dict(current_context().metadata) == {"svc": "api", "req": 1, "step": 2}
                outbox.set_context(session_id="late")  # the scope changes under the block
                assert current_context().session_id == "late"
                assert user() == "job"
            assert user() == "authenticated"
        assert user() == "outside"


def test_threads_of_another_request_do_not_see_this_one() -> None:
    barrier = threading.Barrier(2, timeout=5)
    results: dict[str, str | None] = {}

    def request(name: str) -> None:
        with outbox.request_scope(user_id=name):
            barrier.wait()
            results[name] = user()

    threads = [threading.Thread(target=request, args=(n,)) for n in ("r1", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"r1": "r1", "r2": "r2"}

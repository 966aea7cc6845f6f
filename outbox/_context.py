"""``outbox.context(...)``: who is acting, for the events created inside the block.

Stored in a :mod:`contextvars` variable, so it follows ``await`` and each asyncio task / anyio
task gets its own copy; threads start with an empty context unless the caller copies it
(``contextvars.copy_context().run(...)``, which ``anyio.to_thread.run_sync`` does for you).
Blocks nest: inner values override outer ones, metadata is merged.

Frameworks do not always enter and leave a block in the same :class:`contextvars.Context`:
FastAPI runs a sync ``yield`` dependency's two halves in two worker threads, each with its own
*copy* of the request's context. A block is therefore never left by ``ContextVar.reset`` alone
(which raises in another context), and a **request scope** (:func:`request_scope`, opened by
:class:`outbox.asgi.ContextMiddleware`, :func:`outbox.fastapi.acting_user` and
:func:`outbox.flask.init_app`) makes values reach the rest of the request:

- the scope is one mutable object that every copy of the request's context shares;
- :func:`set_context` sets values on it for the rest of the request (what an authentication
  dependency wants: a session dependency that commits on its exit still sees the user);
- a ``context()`` block entered on another thread than the one that opened the scope (a worker
  thread of the request) is also published on the scope while it is open, so the endpoint, which
  runs in another copy, sees it. Blocks on the scope's own thread stay private to their task:
  concurrent tasks of one request keep their own values.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from outbox.exceptions import OutboxError

__all__ = [
    "EventContext",
    "context",
    "current_context",
    "in_request_scope",
    "request_scope",
    "set_context",
]

log = logging.getLogger("outbox.context")


@dataclass(frozen=True, slots=True)
class EventContext:
    """The acting user/session and extra metadata stamped on new events."""

    user_id: str | None = None
    session_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_EMPTY = EventContext()
# Entries are ordered by creation: where a request scope offers a block published from another
# thread, the newest visible block is the innermost one.
_order = itertools.count(1)


def _merge(
    base: EventContext,
    user_id: str | int | None,
    session_id: str | int | None,
    metadata: Mapping[str, Any] | None,
) -> EventContext:
    if user_id is None and session_id is None and not metadata:
        return base
    merged = dict(base.metadata)
    if metadata:
        merged.update(metadata)
    return EventContext(
        user_id=base.user_id if user_id is None else str(user_id),
        session_id=base.session_id if session_id is None else str(session_id),
        metadata=MappingProxyType(merged),
    )


def _combine(base: EventContext, inner: EventContext) -> EventContext:
    if base is _EMPTY:
        return inner
    if inner is _EMPTY:
        return base
    return _merge(base, inner.user_id, inner.session_id, inner.metadata)


class _Entry:
    """One open ``context()`` block. Inside a request scope ``values`` holds only what blocks
    of that scope set (the scope's own values are applied under them when read)."""

    __slots__ = ("order", "scope", "values")

    def __init__(self, values: EventContext, scope: _RequestScope | None) -> None:
        self.values = values
        self.scope = scope
        self.order = next(_order)


_ROOT = _Entry(_EMPTY, None)
_ROOT.order = 0


class _RequestScope:
    """Values shared by every copy of one request's context (see the module doc)."""

    __slots__ = ("_lock", "base", "outer", "published", "thread")

    def __init__(self, outer: EventContext, values: EventContext) -> None:
        self.thread = threading.get_ident()
        self.outer = outer  # what was in effect where the scope opened
        self.base = _combine(outer, values)  # outer + set_context() values
        self.published: list[_Entry] = []
        self._lock = threading.Lock()

    def set(self, user_id: Any, session_id: Any, metadata: Mapping[str, Any] | None) -> None:
        with self._lock:
            self.base = _merge(self.base, user_id, session_id, metadata)

    def publish(self, entry: _Entry) -> None:
        with self._lock:
            self.published.append(entry)

    def withdraw(self, entry: _Entry) -> None:
        with self._lock:
            for i in range(len(self.published) - 1, -1, -1):
                if self.published[i] is entry:
                    del self.published[i]
                    break

    def newest(self, entry: _Entry) -> _Entry:
        """``entry`` or the newest block published on the scope, whichever is newer."""
        published = self.published
        if published:
            with self._lock:
                if published and published[-1].order > entry.order:
                    return published[-1]
        return entry


_current: contextvars.ContextVar[_Entry] = contextvars.ContextVar("outbox_context", default=_ROOT)
_scope: contextvars.ContextVar[_RequestScope | None] = contextvars.ContextVar(
    "outbox_request_scope", default=None
)


def _visible() -> tuple[_Entry, _RequestScope | None]:
    entry = _current.get()
    scope = _scope.get()
    if scope is not None:
        entry = scope.newest(entry)
    return entry, scope


def _resolve(entry: _Entry, scope: _RequestScope | None) -> EventContext:
    if scope is None:
        return entry.values
    if entry.scope is scope:
        return _combine(scope.base, entry.values)
    return scope.base  # a block from outside the scope: scope.outer already includes it


def current_context() -> EventContext:
    """The context in effect here (an empty one outside any ``context`` block)."""
    entry, scope = _visible()
    return _resolve(entry, scope)


_warned_foreign_exit = False


@contextmanager
def context(
    *,
    user_id: str | int | None = None,
    session_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[EventContext]:
    """Set the acting user/session (and metadata) for events created inside the block.

    ``user_id`` may be an int; it is stored as its decimal string. Usable around sync code,
    ``async`` code, in middleware and in framework dependencies (see the module doc for blocks
    that a framework enters and leaves in different contexts).
    """
    outer, scope = _visible()
    if scope is not None:
        base = outer.values if outer.scope is scope else _EMPTY
        entry = _Entry(_merge(base, user_id, session_id, metadata), scope)
    else:
        entry = _Entry(_merge(outer.values, user_id, session_id, metadata), None)
    previous = _current.get()
    token = _current.set(entry)
    shared = scope is not None and threading.get_ident() != scope.thread
    if shared:
        assert scope is not None
        scope.publish(entry)
    try:
        yield _resolve(entry, scope)
    finally:
        if shared:
            assert scope is not None
            scope.withdraw(entry)
        _leave(token, entry, previous, scope)


def _leave(
    token: contextvars.Token[_Entry], entry: _Entry, previous: _Entry,
    scope: _RequestScope | None,
) -> None:
    try:
        _current.reset(token)
        return
    except ValueError:  # left in another Context than it was entered in (a framework's copy)
        pass
    if _current.get() is entry:
        _current.set(previous)
    global _warned_foreign_exit
    if scope is None and not _warned_foreign_exit:
        _warned_foreign_exit = True
        log.warning(
            "outbox.context() was left in another contextvars.Context than it was entered in "
            "(a sync FastAPI yield dependency runs in worker threads): its values did not reach "
            "the code between. Install outbox.asgi.ContextMiddleware, or use "
            "outbox.fastapi.acting_user, so they do (docs/fastapi.md)."
        )


@contextmanager
def request_scope(
    *,
    user_id: str | int | None = None,
    session_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """One request's context: values given here or with :func:`set_context` inside it hold
    for the rest of the request, in every task and worker thread the request's code runs in.

    The framework integrations open it for you; open it yourself around a unit of work of
    another framework (a job, a message handler) whose code sets the acting user part way in.
    """
    outer, enclosing = _visible()
    scope = _RequestScope(_resolve(outer, enclosing),
                          _merge(_EMPTY, user_id, session_id, metadata))
    token = _scope.set(scope)
    try:
        yield
    finally:
        try:
            _scope.reset(token)
        except ValueError:  # left in another Context: drop it there if it is still ours
            if _scope.get() is scope:
                _scope.set(enclosing)


def in_request_scope() -> bool:
    """True inside :func:`request_scope` (a request handled with an outbox integration)."""
    return _scope.get() is not None


def set_context(
    *,
    user_id: str | int | None = None,
    session_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Set the acting user/session (and metadata) for the rest of the current request.

    Call it where the request is authenticated. Needs a request scope (the ASGI middleware,
    the Flask hook, or :func:`request_scope`); outside one it raises :class:`OutboxError`,
    since there is no end of a request at which the values could be taken back.
    """
    scope = _scope.get()
    if scope is None:
        raise OutboxError(
            "outbox.set_context() needs a request scope: install outbox.asgi.ContextMiddleware "
            "(ASGI/FastAPI) or outbox.flask.init_app(app), or open `with "
            "outbox.request_scope():` yourself; for one block use `with outbox.context(...)`"
        )
    scope.set(user_id, session_id, metadata)

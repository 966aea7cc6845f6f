"""``outbox.context(...)``: who is acting, for the events created inside the block.

Stored in a :mod:`contextvars` variable, so it follows ``await`` and each asyncio task / anyio
task gets its own copy; threads start with an empty context unless the caller copies it
(``contextvars.copy_context().run(...)``, which ``anyio.to_thread.run_sync`` does for you).
Blocks nest: inner values override outer ones, metadata is merged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["EventContext", "context", "current_context"]


@dataclass(frozen=True, slots=True)
class EventContext:
    """The acting user/session and extra metadata stamped on new events."""

    user_id: str | None = None
    session_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_EMPTY = EventContext()
_current: contextvars.ContextVar[EventContext] = contextvars.ContextVar(
    "outbox_context", default=_EMPTY
)


def current_context() -> EventContext:
    """The context in effect here (an empty one outside any ``context`` block)."""
    return _current.get()


@contextmanager
def context(
    *,
    user_id: str | int | None = None,
    session_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[EventContext]:
    """Set the acting user/session (and metadata) for events created inside the block.

    ``user_id`` may be an int; it is stored as its decimal string. Usable around sync code,
    ``async`` code and in middleware (one block per request).
    """
    outer = _current.get()
    merged_meta = dict(outer.metadata)
    if metadata:
        merged_meta.update(metadata)
    ctx = EventContext(
        user_id=outer.user_id if user_id is None else str(user_id),
        session_id=outer.session_id if session_id is None else str(session_id),
        metadata=MappingProxyType(merged_meta),
    )
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)

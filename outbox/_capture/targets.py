"""``capture(target)``: which sync ``Session`` class or instance the listeners go on.

``sessionmaker``, ``scoped_session``, ``async_sessionmaker`` and ``AsyncSession`` stand for a
sync session class or instance; an ``async_sessionmaker`` gets a ``Session`` subclass of its own,
so that capturing one async sessionmaker never captures every plain ``Session`` in the process.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox.exceptions import CaptureError

__all__ = ["engine_pool", "overlaps", "resolve_target"]

# async_sessionmaker -> the Session subclass capture gave it.
_async_sync_classes: weakref.WeakKeyDictionary[Any, type[Session]] = weakref.WeakKeyDictionary()


def resolve_target(target: Any) -> type[Session] | Session:
    """The sync ``Session`` class or instance whose events stand for ``target``."""
    if isinstance(target, scoped_session):
        factory = target.session_factory
        if not isinstance(factory, sessionmaker):
            raise CaptureError(
                "capture(): this scoped_session is built on "
                f"{type(factory).__name__}, not a sessionmaker; pass the sessionmaker"
            )
        target = factory
    if isinstance(target, sessionmaker):
        cls: type[Session] = target.class_
        return cls
    if isinstance(target, type) and issubclass(target, Session):
        return target
    if isinstance(target, Session):
        return target
    resolved = _resolve_async_target(target)
    if resolved is not None:
        return resolved
    raise CaptureError(
        "capture() needs a Session class, sessionmaker, scoped_session, Session, "
        f"async_sessionmaker or AsyncSession; got {target!r}"
    )


def _resolve_async_target(target: Any) -> type[Session] | Session | None:
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - greenlet missing: no async sessions exist either
        return None
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        existing = _async_sync_classes.get(target)
        if existing is not None:
            return existing
        base: type[Session] = (
            target.kw.get("sync_session_class") or target.class_.sync_session_class
        )
        sub = type(base.__name__, (base,), {"__module__": base.__module__})
        target.configure(sync_session_class=sub)
        _async_sync_classes[target] = sub
        return sub
    if isinstance(target, type) and issubclass(target, AsyncSession):
        sync_cls: type[Session] = target.sync_session_class
        return sync_cls
    if isinstance(target, AsyncSession):
        return target.sync_session
    return None


def overlaps(a: object, b: object) -> bool:
    """True when sessions of ``a`` are sessions of ``b`` or the reverse (classes or instances)."""
    if isinstance(a, type) and isinstance(b, type):
        return issubclass(a, b) or issubclass(b, a)
    if isinstance(a, type):
        return isinstance(b, a)
    if isinstance(b, type):
        return isinstance(a, b)
    return a is b


def engine_pool(target: Any) -> Any:
    """The connection pool of an ``Engine``, ``AsyncEngine`` or ``Connection``; else ``None``.

    ``capture(engine)`` captures the connections of a pool: an engine made with
    ``engine.execution_options(...)`` shares it, so it is captured too.
    """
    if isinstance(target, Engine | Connection):
        return target.engine.pool
    sync = getattr(target, "sync_engine", None)  # AsyncEngine / AsyncConnection
    if isinstance(sync, Engine):
        return sync.pool
    return None

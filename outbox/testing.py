"""pytest plugin for applications that use outbox (entry point ``pytest11``): fixtures for a
broker on the memory provider and for asserting the events a block of code emitted, usable in an
application's own test suite.

Fixtures:

``outbox_broker``
    A started :class:`~outbox.Broker` on a fresh :class:`~outbox.MemoryProvider`, installed as
    the default broker (so ``outbox.publish*`` and ``@outbox.subscribe`` use it) and replaced by
    the previous default afterwards. It has every handler registered with ``@outbox.subscribe``
    (unless ``@pytest.mark.outbox(inherit_subscriptions=False)``), retries without delays, and is
    stopped after the test. An async fixture: use it from async tests (``@pytest.mark.anyio``, or
    pytest-asyncio in auto mode). ``await outbox_broker.join()`` waits for queued events.
    ``@pytest.mark.outbox(mode="sync", worker_count=2, retry_policy=..., provider=...)`` passes
    options to the broker.

``outbox_recorder``
    An :class:`EventRecorder` recording every event published (``publish*``/``submit``) or
    dispatched by any broker during the test; ``outbox_recorder.watch(engine)`` adds the rows
    committed to that database's ``events`` table (the transactional events of
    :func:`outbox.capture` and ``session.add(new_event(...))``). Works in sync and async tests::

        def test_signup(outbox_recorder, engine):
            outbox_recorder.watch(engine)
            with outbox_recorder.block() as emitted:
                signup(engine, "a@example.com")
            emitted.assert_emitted("public.users.create", payload={"email": "a@example.com"})
            emitted.assert_not_emitted("public.users.delete")

``captures()`` lists the active :func:`outbox.capture` registrations, so that a fixture can
``.remove()`` the one an application module made at import.

Importing this module loads nothing but pytest: outbox itself is imported when a fixture runs.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from outbox._capture import Capture
    from outbox.broker import Broker, DispatchResult
    from outbox.events import Event

_T = TypeVar("_T")

__all__ = ["EventRecorder", "captures", "outbox_broker", "outbox_recorder"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "outbox(**options): options of the outbox_broker fixture (Broker keyword arguments, "
        "provider=..., inherit_subscriptions=False)",
    )


def captures() -> list[Capture]:
    """The active :func:`outbox.capture` registrations, e.g. to ``.remove()`` an application's
    when its tests are done (``outbox.capture()`` is process-wide)."""
    from outbox._capture import captures as active

    return active()


# -- the recorder ----------------------------------------------------------------------------------


class EventRecorder:
    """Events emitted while it records: through any broker, and in watched ``events`` tables.

    Use it as a context manager (``with EventRecorder() as rec:``) or through the
    ``outbox_recorder`` fixture. Events are copies taken when they were published.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[uuid.UUID, Event] = {}
        self._watches: list[_TableWatch] = []
        self._active = False

    # -- recording ---------------------------------------------------------------------------

    def start(self) -> EventRecorder:
        """Begin recording (idempotent)."""
        from outbox.broker.core import _global_observers

        if not self._active:
            _global_observers.append(self)  # type: ignore[arg-type]
            self._active = True
        return self

    def stop(self) -> None:
        """Stop recording broker events (what was recorded stays)."""
        from outbox.broker.core import _global_observers

        if self._active:
            _global_observers.remove(self)  # type: ignore[arg-type]
            self._active = False

    def __enter__(self) -> EventRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def watch(self, bind: Any) -> None:
        """Also report rows inserted from now on into the ``events`` table of ``bind``.

        ``bind``: an ``Engine`` / ``AsyncEngine`` (committed rows only), or a ``Connection`` /
        ``Session`` (its own uncommitted rows too — handy for tests that roll back).
        """
        self._watches.append(_TableWatch(bind))

    @contextmanager
    def block(self) -> Iterator[EventRecorder]:
        """A recorder for just the ``with`` block (watching the same tables)."""
        inner = EventRecorder()
        inner._watches = [_TableWatch(w.bind) for w in self._watches]
        with inner:
            yield inner

    def clear(self) -> None:
        """Forget what was recorded so far (table watches restart from the current rows)."""
        with self._lock:
            self._seen.clear()
        self._watches = [_TableWatch(w.bind) for w in self._watches]

    # broker observer hooks
    def on_published(self, broker: Broker, event: Event) -> None:
        self._record(event)

    def on_processed(self, broker: Broker, event: Event, status: str, duration: float) -> None:
        pass

    def on_dispatched(
        self, broker: Broker, event: Event, result: DispatchResult, duration: float
    ) -> None:
        self._record(event)

    def _record(self, event: Event) -> None:
        from outbox.providers.memory import copy_event

        with self._lock:
            if event.id not in self._seen:
                self._seen[event.id] = copy_event(event)

    # -- reading -----------------------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """Every recorded event: broker events in publish order, then new table rows by seq."""
        with self._lock:
            out = dict(self._seen)
        for watch in self._watches:
            for event in watch.new_rows():
                out.setdefault(event.id, event)
        return list(out.values())

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def find(
        self,
        pattern: str = "*",
        *,
        payload: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> list[Event]:
        """Recorded events whose type matches ``pattern`` (:mod:`outbox._patterns`), whose payload
        and metadata contain ``payload``/``metadata`` (nested dicts compared as subsets), and whose
        attributes equal ``fields`` (``source=``, ``user_id=``, ``entity_id=`` …)."""
        from outbox._patterns import compile_pattern
        from outbox.events import Event

        compiled = compile_pattern(pattern)
        unknown = [name for name in fields if not hasattr(Event, name)]
        if unknown:
            raise TypeError(f"Event has no attribute {unknown[0]!r}")
        return [
            e for e in self.events
            if compiled.matches(e.type)
            and (payload is None or _contains(e.payload, payload))
            and (metadata is None or _contains(e.meta, metadata))
            and all(_equal(getattr(e, k), v) for k, v in fields.items())
        ]

    def assert_emitted(
        self,
        pattern: str = "*",
        *,
        payload: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        count: int | None = None,
        **fields: Any,
    ) -> Event:
        """Fail unless an event matches (exactly ``count`` of them, if given); return the first."""
        found = self.find(pattern, payload=payload, metadata=metadata, **fields)
        wanted = _describe(pattern, payload, metadata, fields)
        if not found:
            pytest.fail(f"no event emitted matching {wanted}; emitted: {self._summary()}",
                        pytrace=False)
        if count is not None and len(found) != count:
            pytest.fail(f"expected {count} event(s) matching {wanted}, found {len(found)}; "
                        f"emitted: {self._summary()}", pytrace=False)
        return found[0]

    def assert_not_emitted(
        self,
        pattern: str = "*",
        *,
        payload: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Fail if any recorded event matches."""
        found = self.find(pattern, payload=payload, metadata=metadata, **fields)
        if found:
            wanted = _describe(pattern, payload, metadata, fields)
            pytest.fail(f"expected no event matching {wanted}, found {len(found)}: "
                        f"{_summary(found)}", pytrace=False)

    def _summary(self) -> str:
        return _summary(self.events) or "nothing"


def _summary(events: list[Event]) -> str:
    shown = [f"{e.type} {e.payload!r}" for e in events[:20]]
    more = f" … and {len(events) - 20} more" if len(events) > 20 else ""
    return "; ".join(shown) + more


def _describe(pattern: str, payload: Any, metadata: Any, fields: Mapping[str, Any]) -> str:
    parts = [repr(pattern)]
    if payload is not None:
        parts.append(f"payload ⊇ {payload!r}")
    if metadata is not None:
        parts.append(f"metadata ⊇ {metadata!r}")
    parts.extend(f"{k}={v!r}" for k, v in fields.items())
    return ", ".join(parts)


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _contains(actual[k], v) for k, v in expected.items()
        )
    return _equal(actual, expected)


def _equal(actual: Any, expected: Any) -> bool:
    # Event columns hold text (user_id "7", status "pending"): compare enums and ids as text.
    if actual == expected:
        return True
    if isinstance(actual, str) and not isinstance(expected, (str, bytes, Mapping, list)):
        value = getattr(expected, "value", expected)
        return actual == str(value)
    if isinstance(actual, uuid.UUID) and isinstance(expected, str):
        return str(actual) == expected
    return False


class _TableWatch:
    """Rows of the ``events`` table of ``bind`` with a ``seq`` above the one seen at creation."""

    def __init__(self, bind: Any) -> None:
        self.bind = bind
        self._engine = _sync_engine(bind)
        self.mark = self._max_seq()

    def _run(self, fn: Callable[[Any], _T]) -> _T:
        """``fn(connection)`` on the watched bind (a session's own connection: its writes)."""
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        bind = self._engine or self.bind
        if isinstance(bind, sa.Engine):
            with bind.connect() as conn:
                return fn(conn)
        if isinstance(bind, sa.Connection):
            return fn(bind)
        if isinstance(bind, Session):
            with bind.no_autoflush:
                return fn(bind.connection())
        raise TypeError(
            "watch() takes an Engine, AsyncEngine, Connection or Session, not "
            f"{type(self.bind).__qualname__}"
        )

    def _max_seq(self) -> int:
        from outbox._sql import events as event_sql

        return self._run(event_sql.max_seq)

    def new_rows(self) -> list[Event]:
        from outbox._sql import events as event_sql

        return self._run(lambda conn: event_sql.events_after(conn, self.mark))


def _sync_engine(bind: Any) -> Any:
    """For an ``AsyncEngine``, a sync engine on the same database: the recorder's methods are
    sync (called from async tests too), and an async engine's connections can only be used by
    awaiting them. Same driver library in its sync mode (``outbox._engines.sync_url``), no pool."""
    from sqlalchemy.ext.asyncio import AsyncEngine

    if not isinstance(bind, AsyncEngine):
        return None
    import sqlalchemy as sa

    from outbox._engines import sync_url

    return sa.create_engine(sync_url(bind.url), poolclass=sa.NullPool)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def outbox_recorder() -> Iterator[EventRecorder]:
    """Records every event published or dispatched during the test (see the module doc)."""
    with EventRecorder() as recorder:
        yield recorder


@pytest.fixture
async def outbox_broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A started memory-provider broker installed as the default broker for the test."""
    from outbox._retry import RetryPolicy
    from outbox.broker import Broker, default
    from outbox.providers.memory import MemoryProvider

    options: dict[str, Any] = {
        "retry_policy": RetryPolicy(max_retries=3, initial_delay=0.0, max_delay=0.0, jitter=0.0),
    }
    marker = request.node.get_closest_marker("outbox")
    if marker is not None:
        options.update(marker.kwargs)
    inherit = bool(options.pop("inherit_subscriptions", True))
    stop_timeout = float(options.pop("stop_timeout", 5.0))
    provider = options.pop("provider", None)
    own_provider = provider is None
    if own_provider:
        provider = MemoryProvider()
    broker = Broker(provider, **options)
    saved = default._snapshot()
    default.set_default_broker(broker, inherit=inherit)
    try:
        await broker.start()
        yield broker
    finally:
        try:
            await broker.stop(stop_timeout)
            if own_provider:
                await provider.close()
        finally:
            default._restore(saved)

"""Logging conventions of the outbox, and the sidecars' ``--log-level`` / ``--log-format``.

- One logger per module: ``log = logging.getLogger(__name__)`` (all under ``outbox``).
- Records about an event carry ``event_id``, ``event_type`` and ``event_seq``: pass
  ``extra=event_extra(event)``, or wrap the work on one event in ``with event_context(event):``
  so every record emitted inside — the relay's and the application handler's own — gets them
  (:class:`EventContextFilter`, installed by :func:`configure_logging`, adds them).
- ``--log-format json`` writes one JSON object per line (:class:`JsonFormatter`): ``ts``,
  ``level``, ``logger``, ``message``, the event fields, ``trace_id``/``span_id`` when an
  OpenTelemetry span is active, any other ``extra`` keys, and ``exc`` for exceptions.

Both formatters hide the credentials of URLs (``scheme://user:***@host``, ``nats://***@host``:
:func:`redact`, the rule reprs and error messages use too) as a last line of defence: code must
still never log secrets.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from outbox._redact import redact
from outbox._tracing import current_span_context

if TYPE_CHECKING:
    from outbox.events import Event

__all__ = [
    "EVENT_FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "EventContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "add_logging_arguments",
    "configure_logging",
    "current_event",
    "event_context",
    "event_extra",
    "preserved_logging",
    "redact",
]

#: Record attributes naming the event a record is about.
EVENT_FIELDS: tuple[str, ...] = ("event_id", "event_type", "event_seq")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_current_event: contextvars.ContextVar[Event | None] = contextvars.ContextVar(
    "outbox_log_event", default=None
)

def event_extra(event: Event) -> dict[str, Any]:
    """``extra=`` for a record about ``event``: its id, type and seq."""
    return {
        "event_id": str(event.id),
        "event_type": event.type,
        "event_seq": event.__dict__.get("seq"),
    }


class event_context:  # lower case: used like a function, ``with event_context(event):``
    """Records emitted inside the block (in this task/thread) are about ``event``.

    Cheap enough for the relay to wrap every event (a context variable set and reset; the
    fields are only computed when a record is actually emitted).
    """

    __slots__ = ("_event", "_token")

    def __init__(self, event: Event) -> None:
        self._event = event

    def __enter__(self) -> Event:
        self._token = _current_event.set(self._event)
        return self._event

    def __exit__(self, *exc: object) -> None:
        _current_event.reset(self._token)


def current_event() -> Event | None:
    """The event of the enclosing :func:`event_context`, if any."""
    return _current_event.get()


class EventContextFilter(logging.Filter):
    """Adds the event fields of the enclosing :func:`event_context` to records lacking them."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = _current_event.get()
        if event is not None:
            for key, value in event_extra(event).items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}


def _trace_ids() -> dict[str, str]:
    ctx = current_span_context()
    if ctx is None:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in EVENT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        doc.update(_trace_ids())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc and not key.startswith("_"):
                doc[key] = _jsonable(value)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [event_id=… event_type=… event_seq=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        parts = [
            f"{key}={value}" for key in EVENT_FIELDS
            if (value := getattr(record, key, None)) is not None
        ]
        if parts:
            head, sep, tail = text.partition("\n")  # keep a traceback below the first line
            text = f"{head} [{' '.join(parts)}]{sep}{tail}"
        return redact(text)


_HANDLER_MARK = "_outbox_sidecar_handler"


def configure_logging(
    level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Set up the root logger of a sidecar process: one stream handler, the chosen format.

    Idempotent: a handler installed by an earlier call is replaced. ``ValueError`` names the
    allowed values for a bad level or format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if isinstance(level, str):
        name = level.upper()
        if name not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        level = getattr(logging, name)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(EventContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@contextmanager
def preserved_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back as they were when the block ends.

    The CLIs' ``main()`` runs in one: ``python -m …`` exits anyway, but a ``main(argv)`` called as a
    function (tests, an embedding application) must not leave its handler on the host's logger.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def add_logging_arguments(parser: argparse.ArgumentParser, *,
                          default_level: str | None = "INFO") -> None:
    """``--log-level`` and ``--log-format`` for a sidecar's argument parser (``default_level``
    ``None``: the config's ``log_level`` decides)."""
    parser.add_argument(
        "--log-level", default=default_level, type=str.upper, choices=LOG_LEVELS,
        help="minimum level of log records (default "
             f"{default_level or 'the config log_level, INFO'})",
    )
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS,
        help="text (default) or json: one JSON object per line",
    )

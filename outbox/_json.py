"""Turning Python values into JSON-safe values (event payloads and changes), and back to text.

Rules: datetimes, dates and times as ISO 8601 (naive values stay naive, aware keep their offset);
``UUID`` and ``Decimal`` as strings; ``bytes`` as standard base64; ``Enum`` as its value;
``timedelta`` as total seconds; mappings and sequences recursively. ``NaN`` and infinities are
refused (PostgreSQL's jsonb rejects them, and most JSON parsers do too).
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import math
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

__all__ = ["NotSerialisable", "dumps", "dumps_safe", "loads", "loads_column", "to_jsonable"]

_orjson: Any
try:  # the postgres extra brings it: parsing and writing JSON several times faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - stdlib json then
    _orjson = None


class NotSerialisable(TypeError):
    """Internal signal: ``value`` (found at ``path``) has no JSON form.

    Callers that know the model and column turn it into :class:`SerializationError`.
    """

    def __init__(self, value: object, path: str = "") -> None:
        self.value = value
        self.path = path
        where = path or "<root>"
        super().__init__(f"{type(value).__qualname__} at {where} is not JSON-serialisable")


_PASSTHROUGH: frozenset[type] = frozenset({str, int, bool, type(None)})


def _float(value: float) -> float:
    if math.isfinite(value):
        return value
    raise NotSerialisable(value)


def _bytes(value: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(value)).decode("ascii")


def _datetime(value: dt.datetime) -> str:
    return value.isoformat()


_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    float: _float,
    dt.datetime: _datetime,
    dt.date: dt.date.isoformat,
    dt.time: dt.time.isoformat,
    dt.timedelta: dt.timedelta.total_seconds,
    Decimal: str,
    uuid.UUID: str,
    bytes: _bytes,
    bytearray: _bytes,
    memoryview: _bytes,
}


def to_jsonable(value: Any, path: str = "") -> Any:
    """Return ``value`` as JSON-safe data (dict/list/str/int/float/bool/None).

    Raises :class:`NotSerialisable` for anything without a documented JSON form.
    """
    cls = type(value)
    if cls in _PASSTHROUGH:
        return value
    conv = _CONVERTERS.get(cls)
    if conv is not None:
        try:
            return conv(value)
        except NotSerialisable as exc:
            raise NotSerialisable(value, path) from exc
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, path)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if isinstance(key, int | float | bool | enum.Enum | uuid.UUID):
                    key = str(key.value if isinstance(key, enum.Enum) else key)
                else:
                    raise NotSerialisable(key, f"{path}.<key>")
            out[key] = to_jsonable(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [to_jsonable(item, f"{path}[{i}]") for i, item in enumerate(items)]
    # Subclasses of the supported scalar types (str/int subclasses, datetime subclasses, ...).
    for base, conv in _CONVERTERS.items():
        if isinstance(value, base):
            return conv(value)
    if isinstance(value, str | int):
        return value
    raise NotSerialisable(value, path)


def dumps(value: Any) -> str:
    """Compact JSON text of ``value`` (converted with :func:`to_jsonable`)."""
    return dumps_safe(to_jsonable(value))


def dumps_safe(value: Any) -> str:
    """Compact JSON text of a value that is JSON-safe already (what :func:`to_jsonable` returns):
    with orjson when it is installed, else (and for what orjson refuses: integers beyond 64
    bits) with the standard library, to the same text."""
    if _orjson is not None:
        try:
            text: str = _orjson.dumps(value).decode()
            return text
        except (TypeError, _orjson.JSONEncodeError):
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """Parse JSON text (orjson when installed; the standard library for what it refuses,
    integers beyond 64 bits, so the result is the same)."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text)


def loads_column(value: Any) -> Any:
    """A JSON column read as text (a driver that decoded it already passes its value through):
    rows decoded one by one, so that one unreadable value fails alone."""
    return loads(value) if isinstance(value, str | bytes) else value

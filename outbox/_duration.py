"""The one duration grammar of outbox: command-line flags and config values alike.

A duration is one or more ``<number><unit>`` parts, units ``ms``, ``s``, ``m``, ``h``, ``d``,
``w``, written together (``30d``, ``1h30m``, ``90s``, ``2w``, ``500ms``, ``1.5h``; any case).
Config values that are durations also take a plain number of seconds (``0.5``); the
command line does not (``--older-than 30`` would be ambiguous).

A *time* (``--since``, ``--until``, the console's filters) is a duration ago or an ISO 8601
date/time: :func:`parse_time`.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["parse_duration", "parse_time"]

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``30d``, ``1h30m``, ``90s``, ``2w``, ``500ms`` → timedelta (``ValueError`` otherwise)."""
    value = text.strip().lower()
    pos, total, found = 0, 0.0, False
    for m in _PART.finditer(value):
        if m.start() != pos or value[pos:m.start()].strip():
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos, found = m.end(), True
    if not found or value[pos:].strip():
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d, w), e.g. 30d or "
            "1h30m"
        )
    try:
        return dt.timedelta(seconds=total)
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: longer than a timedelta holds") from None


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A duration ago (``1h``) or an ISO 8601 date/time (UTC when no offset is given)."""
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return (now or dt.datetime.now(dt.UTC)) - ago
        except OverflowError:
            raise ValueError(f"invalid time {text!r}: that is before the year 1") from None
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use a duration ago (30m, 1h, 7d) or an ISO 8601 time "
            "(2026-01-31, 2026-01-31T12:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)

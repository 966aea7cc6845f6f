"""Subscription patterns over dotted event types (SPEC §4).

- ``*`` alone matches every type;
- otherwise segments are separated by ``.``; a ``*`` segment matches exactly one segment;
- a final ``>`` segment matches one or more remaining segments;
- any other segment is literal and made of ``[A-Za-z0-9_-]``.

Invalid patterns raise :class:`ValueError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Pattern", "compile_pattern", "matches"]

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed pattern. ``segments`` excludes a trailing ``>`` (see ``tail``)."""

    text: str
    segments: tuple[str, ...]
    tail: bool  # True when the pattern ends with ``>``
    match_all: bool  # the lone ``*``

    def matches(self, event_type: str) -> bool:
        """True when ``event_type`` matches this pattern."""
        if self.match_all:
            return True
        parts = event_type.split(".")
        n = len(self.segments)
        if self.tail:
            if len(parts) <= n:
                return False
        elif len(parts) != n:
            return False
        for seg, part in zip(self.segments, parts, strict=False):
            if seg != "*" and seg != part:
                return False
        return True

    @property
    def is_literal(self) -> bool:
        """True for a pattern without wildcards (it matches exactly one type)."""
        return not self.match_all and not self.tail and "*" not in self.segments


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Pattern:
    """Parse and validate ``pattern``; raise :class:`ValueError` naming what is wrong."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, not {type(pattern).__qualname__}")
    if pattern == "*":
        return Pattern(pattern, (), tail=False, match_all=True)
    if not pattern:
        raise ValueError("invalid pattern '': empty pattern")
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part == "":
            raise ValueError(f"invalid pattern {pattern!r}: empty segment at position {i + 1}")
        if part == ">":
            if i != len(parts) - 1:
                raise ValueError(f"invalid pattern {pattern!r}: '>' is only allowed as the last "
                                 "segment")
            continue
        if part == "*":
            continue
        if not _SEGMENT.fullmatch(part):
            raise ValueError(
                f"invalid pattern {pattern!r}: segment {part!r} may only contain letters, digits, "
                "'_' and '-', or be exactly '*' or '>'"
            )
    tail = parts[-1] == ">"
    segments = tuple(parts[:-1] if tail else parts)
    return Pattern(pattern, segments, tail=tail, match_all=False)


def matches(pattern: str, event_type: str) -> bool:
    """True when ``event_type`` matches ``pattern`` (compiling and caching the pattern)."""
    return compile_pattern(pattern).matches(event_type)

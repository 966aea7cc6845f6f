"""Subscription patterns over dotted event types.

- ``*`` alone matches every type;
- otherwise segments are separated by ``.``; a ``*`` segment matches exactly one segment;
- a final ``>`` segment matches one or more remaining segments;
- any other segment is literal and made of ``[A-Za-z0-9_-]``.

Invalid patterns raise :class:`ValueError`.

:class:`SubscriptionIndex` finds every subscription matching an event type without scanning them
all: patterns live in a segment trie, so a lookup visits only the branches the type's segments can
follow, and the result per type is cached until the subscriptions change.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

__all__ = ["Pattern", "SubscriptionIndex", "compile_pattern", "matches"]

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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Node(Generic[K]):
    """One trie level. Subscriptions are stored as ``key -> insertion order``."""

    __slots__ = ("children", "exact", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.star: _Node[K] | None = None
        self.exact: dict[K, int] = {}  # patterns that end at this node
        self.tail: dict[K, int] = {}  # patterns ``<path to here>.>``

    def empty(self) -> bool:
        return not (self.children or self.star or self.exact or self.tail)


class SubscriptionIndex(Generic[K, V]):
    """Subscriptions keyed by ``key``, looked up by event type in a segment trie.

    :meth:`match` returns the values of every subscription whose pattern matches the type, in the
    order they were added. Results are cached per type (``cache_size`` types, oldest dropped
    first); any :meth:`add`/:meth:`remove` clears the cache. Safe to mutate from several threads
    while another thread matches.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._root: _Node[K] = _Node()
        self._all: dict[K, int] = {}  # the lone ``*``
        self._entries: dict[K, tuple[Pattern, V, int]] = {}
        self._order = 0
        self._cache: dict[str, tuple[V, ...]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def pattern(self, key: K) -> Pattern:
        return self._entries[key][0]

    def values(self) -> list[V]:
        """Every value, in insertion order."""
        return [v for _, v, _ in self._entries.values()]

    def add(self, key: K, pattern: str | Pattern, value: V) -> Pattern:
        """Index ``value`` under ``pattern``; ``ValueError`` for a bad pattern or a used key."""
        compiled = pattern if isinstance(pattern, Pattern) else compile_pattern(pattern)
        with self._lock:
            if key in self._entries:
                raise ValueError(f"subscription key {key!r} is already in the index")
            order = self._order
            self._order += 1
            self._slot(compiled, create=True)[key] = order
            self._entries[key] = (compiled, value, order)
            self._cache.clear()
        return compiled

    def remove(self, key: K) -> V:
        """Remove the subscription ``key`` and return its value; ``KeyError`` if unknown."""
        with self._lock:
            compiled, value, _ = self._entries.pop(key)
            path = self._path(compiled)
            slot = self._all if compiled.match_all else (
                path[-1].tail if compiled.tail else path[-1].exact
            )
            del slot[key]
            self._prune(compiled, path)
            self._cache.clear()
        return value

    def clear(self) -> None:
        with self._lock:
            self._root = _Node()
            self._all.clear()
            self._entries.clear()
            self._cache.clear()

    def match(self, event_type: str) -> tuple[V, ...]:
        """Values of the subscriptions matching ``event_type``, in insertion order."""
        hit = self._cache.get(event_type)
        if hit is not None:
            return hit
        with self._lock:
            result = self._lookup(event_type)
            cache = self._cache
            if len(cache) >= self._cache_size:
                del cache[next(iter(cache))]
            cache[event_type] = result
        return result

    def match_uncached(self, event_type: str) -> tuple[V, ...]:
        """Same as :meth:`match` without the cache (for benchmarks and tests)."""
        with self._lock:
            return self._lookup(event_type)

    # -- internals ---------------------------------------------------------------------------

    def _lookup(self, event_type: str) -> tuple[V, ...]:
        found: list[tuple[int, K]] = [(o, k) for k, o in self._all.items()]
        nodes = [self._root]
        for part in event_type.split("."):
            nxt: list[_Node[K]] = []
            for node in nodes:
                if node.tail:  # at least this segment remains: ``>`` matches
                    found.extend((o, k) for k, o in node.tail.items())
                child = node.children.get(part)
                if child is not None:
                    nxt.append(child)
                if node.star is not None:
                    nxt.append(node.star)
            nodes = nxt
            if not nodes:
                break
        for node in nodes:
            if node.exact:
                found.extend((o, k) for k, o in node.exact.items())
        if len(found) > 1:
            found.sort(key=_first)
        entries = self._entries
        return tuple(entries[k][1] for _, k in found)

    def _slot(self, compiled: Pattern, *, create: bool) -> dict[K, int]:
        if compiled.match_all:
            return self._all
        node = self._root
        for seg in compiled.segments:
            if seg == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(seg)
                if child is None:
                    child = node.children[seg] = _Node()
                node = child
        return node.tail if compiled.tail else node.exact

    def _path(self, compiled: Pattern) -> list[_Node[K]]:
        node = self._root
        path = [node]
        for seg in compiled.segments:
            nxt = node.star if seg == "*" else node.children.get(seg)
            assert nxt is not None, "index out of sync with its entries"
            node = nxt
            path.append(node)
        return path

    def _prune(self, compiled: Pattern, path: list[_Node[K]]) -> None:
        """Drop trie nodes left empty by a removal (keeps long-lived indexes small)."""
        if compiled.match_all:
            return
        for depth in range(len(compiled.segments), 0, -1):
            node = path[depth]
            if not node.empty():
                return
            parent, seg = path[depth - 1], compiled.segments[depth - 1]
            if seg == "*":
                parent.star = None
            else:
                del parent.children[seg]


def _first(item: tuple[int, object]) -> int:
    return item[0]

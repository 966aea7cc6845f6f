"""Payload redaction by JSON paths: what the console never shows.

A path is dotted, starts at ``payload`` or ``metadata``, and may use ``*`` for any key or list
element and ``**`` for any depth (none included): ``payload.password``, ``payload.card.number``,
``payload.items.*.token``, ``payload.**.password`` (a ``password`` key anywhere in the payload),
``metadata.auth``. Keys match whatever their case (``payload.password`` hides ``Password``). A
path into the payload also covers that column's old and new values in ``metadata.changes``
(``payload.password`` hides ``metadata.changes.password.old`` and ``.new``), since an update
records the changed columns there.

Error texts are masked too (:meth:`Redactor.error`): a handler's error that echoes a hidden value
(``invalid card 4111…``) shows ``***`` where the value was, for the event the error belongs to.

Nothing here recurses with the data: a payload nested deeper than :data:`MAX_DEPTH` (valid JSON
written by someone's SQL) is shown as :data:`TOO_DEEP` instead of failing the page.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

from outbox._logs import redact as redact_text

__all__ = ["MASK", "MAX_DEPTH", "TOO_DEEP", "Redactor", "too_deep"]

#: What a redacted value is shown as.
MASK = "***"
#: Values nested deeper than this are not shown (no page renders them; capture never writes them).
MAX_DEPTH = 200
#: What a value nested too deep is shown as.
TOO_DEEP = f"(nested deeper than {MAX_DEPTH} levels: not shown)"
#: Hidden values shorter than this are not searched for in error texts (``"1"`` is everywhere).
_SHORTEST_ECHO = 3
_ROOTS = ("payload", "metadata")
_ANY, _DEEP = "*", "**"


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """``value`` holds containers nested more than ``limit`` levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


class Redactor:
    """Replace the values at the configured paths with :data:`MASK` (in copies)."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths: tuple[str, ...] = tuple(dict.fromkeys(p.strip() for p in paths))
        self._by_root: dict[str, list[tuple[str, ...]]] = {root: [] for root in _ROOTS}
        for path in self.paths:
            split = path.split(".")
            if len(split) < 2 or split[0] not in _ROOTS or not all(split) or split[-1] == _DEEP:
                raise ValueError(
                    f"invalid redaction path {path!r}: use payload.<key>[.<key>…] or "
                    "metadata.<key>[…], with * for any key and ** for any depth"
                )
            self._by_root[split[0]].append(tuple(p.casefold() for p in split[1:]))
        # payload.col.rest → metadata.changes.col.{old,new}.rest; payload.**.k → any depth of
        # changes as well.
        for parts in list(self._by_root["payload"]):
            head, rest = parts[0], parts[1:]
            if head == _DEEP:
                self._by_root["metadata"].append(("changes", *parts))
                continue
            for side in ("old", "new"):
                self._by_root["metadata"].append(("changes", head, side, *rest))

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __call__(self, root: str, value: Any) -> Any:
        """A copy of ``value`` (the event's ``payload`` or ``metadata``) with paths masked;
        :data:`TOO_DEEP` for a value nested too deep to show."""
        if too_deep(value):
            return TOO_DEEP
        paths = self._by_root.get(root, [])
        if not paths:
            return value
        out = copy.deepcopy(value)
        for parts in paths:
            out = _mask(out, parts)
        return out

    def changes(self, changes: dict[str, Any]) -> dict[str, Any]:
        """``metadata.changes`` of an update, masked as part of the metadata."""
        masked = self("metadata", {"changes": changes})
        if not isinstance(masked, dict):
            return {"(changes)": TOO_DEEP}
        result: dict[str, Any] = masked["changes"]
        return result

    def hidden_values(self, payload: Any, metadata: Any) -> list[str]:
        """The texts of the values these paths hide in one event, longest first."""
        found: set[str] = set()
        for root, value in (("payload", payload), ("metadata", metadata)):
            if not self._by_root[root] or too_deep(value):
                continue
            for parts in self._by_root[root]:
                for hit in _find(value, parts):
                    found.update(t for t in _texts(hit) if len(t) >= _SHORTEST_ECHO)
        return sorted(found, key=len, reverse=True)

    def error(self, text: str | None, payload: Any = None, metadata: Any = None) -> str | None:
        """``text`` (an event's error) with secrets in URLs and the event's hidden values
        masked."""
        if not text:
            return text
        text = redact_text(text)
        if self:
            for value in self.hidden_values(payload, metadata):
                text = text.replace(value, MASK)
        return text


def _matches(key: Any, part: str) -> bool:
    return part == _ANY or str(key).casefold() == part


def _mask(node: Any, parts: tuple[str, ...]) -> Any:
    """Mask every value ``parts`` reaches in ``node`` (in place; the root returned)."""
    holder = [node]
    for parent, key in list(_places(holder, parts)):
        parent[key] = MASK
    return holder[0]


def _find(node: Any, parts: tuple[str, ...]) -> Iterator[Any]:
    """The values ``parts`` reaches in ``node`` (read only)."""
    return (parent[key] for parent, key in _places([node], parts))


def _places(holder: list[Any], parts: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """``(container, key)`` of every value ``parts`` reaches from ``holder[0]``. No recursion:
    ``**`` walks the whole tree with a work list."""
    work: list[tuple[Any, Any, tuple[str, ...]]] = [(holder, 0, parts)]
    while work:
        parent, key, rest = work.pop()
        if not rest:
            yield parent, key
            continue
        value = parent[key]
        head, tail = rest[0], rest[1:]
        if head == _DEEP:
            work.append((parent, key, tail))  # zero levels
            work.extend((value, k, rest) for k in _children(value))  # one more, still ``**``
            continue
        for k in _children(value):
            if (_matches(k, head) if isinstance(value, dict)
                    else head == _ANY or (head.isdigit() and int(head) == k)):
                work.append((value, k, tail))


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield from list(value)
    elif isinstance(value, list):
        yield from range(len(value))


def _texts(value: Any) -> Iterator[str]:
    """The scalar texts inside a hidden value (a hidden object hides all its leaves)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif node is not None and not isinstance(node, bool):
            yield str(node)

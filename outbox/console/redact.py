"""Payload redaction by JSON paths: what the console never shows.

A path is dotted, starts at ``payload`` or ``metadata``, and may use ``*`` for any key or list
element: ``payload.password``, ``payload.card.number``, ``payload.items.*.token``,
``metadata.auth``. A path into the payload also covers that column's old and new values in
``metadata.changes`` (``payload.password`` hides ``metadata.changes.password.old`` and
``.new``), since an update records the changed columns there.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "Redactor"]

#: What a redacted value is shown as.
MASK = "***"
_ROOTS = ("payload", "metadata")


class Redactor:
    """Replace the values at the configured paths with :data:`MASK` (in copies)."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths: tuple[str, ...] = tuple(dict.fromkeys(p.strip() for p in paths))
        self._by_root: dict[str, list[list[str]]] = {root: [] for root in _ROOTS}
        for path in self.paths:
            parts = path.split(".")
            if len(parts) < 2 or parts[0] not in _ROOTS or not all(parts):
                raise ValueError(
                    f"invalid redaction path {path!r}: use payload.<key>[.<key>…] or "
                    "metadata.<key>[…], with * for any key"
                )
            self._by_root[parts[0]].append(parts[1:])
        # payload.col.rest → metadata.changes.col.{old,new}.rest
        for parts in list(self._by_root["payload"]):
            head, rest = parts[0], parts[1:]
            for side in ("old", "new"):
                self._by_root["metadata"].append(["changes", head, side, *rest])

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __call__(self, root: str, value: Any) -> Any:
        """A copy of ``value`` (the event's ``payload`` or ``metadata``) with paths masked."""
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
        result: dict[str, Any] = masked["changes"]
        return result


def _mask(node: Any, parts: list[str]) -> Any:
    if not parts:
        return MASK
    key, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        keys = list(node) if key == "*" else [key] if key in node else []
        for k in keys:
            node[k] = _mask(node[k], rest)
    elif isinstance(node, list):
        if key == "*":
            indexes = range(len(node))
        elif key.isdigit() and int(key) < len(node):
            indexes = range(int(key), int(key) + 1)
        else:
            indexes = range(0)
        for i in indexes:
            node[i] = _mask(node[i], rest)
    return node

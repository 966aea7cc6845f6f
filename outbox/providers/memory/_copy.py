"""Fast deep copies of events: what the memory provider keeps and hands out."""

from __future__ import annotations

import copy as _copy
from typing import Any

from outbox.events import _ATTR_TO_COLUMN, _MANAGER, Event

__all__ = ["copy_event"]

_SCALARS: frozenset[type] = frozenset({str, int, float, bool, type(None)})


def _json_copy(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return value
    if cls is dict:
        return {k: _json_copy(v) for k, v in value.items()}
    if cls is list:
        return [_json_copy(v) for v in value]
    return _copy.deepcopy(value)


def copy_event(event: Event) -> Event:
    """A deep, transient copy of ``event``.

    Same result as :meth:`Event.copy`, several times faster: only ``payload`` and ``metadata``
    can hold mutable values, and they are JSON-shaped (dicts, lists, scalars), so they are copied
    with a JSON-aware walk instead of :func:`copy.deepcopy`, and the other attributes are shared
    (they are immutable: str, int, UUID, datetime).
    """
    source = event.__dict__
    copy = _new_instance()
    state = copy.__dict__
    own = state[_STATE_ATTR]
    state.update(_DEFAULTS)
    state.update(source)
    state[_STATE_ATTR] = own
    state["payload"] = _json_copy(source.get("payload", {}))
    state["meta"] = _json_copy(source.get("meta", {}))
    return copy


_new_instance = _MANAGER.new_instance
_STATE_ATTR = "_sa_instance_state"
#: What ``Event._from_values`` fills in for attributes an event does not have yet.
_DEFAULTS: dict[str, Any] = {a: None for a in _ATTR_TO_COLUMN} | {"status": "pending",
                                                                  "retry_count": 0}

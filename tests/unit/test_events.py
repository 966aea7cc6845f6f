"""Event mapping, constructors and JSON conversion (no database)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal

import pytest

import outbox
from outbox import _json
from outbox.events import Event


def test_event_type_joins_parts() -> None:
    assert outbox.events.event_type("public", "users", "create") == "public.users.create"
    assert outbox.events.event_type(None, "users", "delete") == "users.delete"


def test_new_event_defaults() -> None:
    ev = outbox.new_event(outbox.EventSource.WEBSOCKET, "chat.message", {"room": "lobby"})
    assert isinstance(ev.id, uuid.UUID)
    assert ev.status == "pending"
    assert ev.source == "websocket"
    assert ev.payload == {"room": "lobby"}
    assert ev.created_at.tzinfo is not None
    assert ev.next_attempt_at == ev.created_at
    assert ev.instance_id == outbox.events.get_instance_id()
    assert ev.retry_count == 0
    assert ev.meta == {}


def test_new_event_takes_user_from_context_and_stringifies_ids() -> None:
    with outbox.context(user_id=42, session_id="s1", metadata={"req": "r1"}):
        ev = outbox.new_event("system", "a.b", metadata={"x": 1})
    assert ev.user_id == "42"
    assert ev.session_id == "s1"
    assert ev.meta == {"req": "r1", "x": 1}
    explicit = outbox.new_event("system", "a.b", user_id=7, entity_id=9)
    assert (explicit.user_id, explicit.entity_id) == ("7", "9")


def test_new_event_rejects_unserialisable_payload() -> None:
    with pytest.raises(outbox.exceptions.SerializationError) as info:
        outbox.new_event("system", "a.b", {"obj": object()})
    assert "payload.obj" in str(info.value)
    assert "builtins.object" in str(info.value)


def test_new_event_rejects_empty_type() -> None:
    with pytest.raises(ValueError):
        outbox.new_event("system", "")


def test_instance_id_override() -> None:
    try:
        outbox.events.set_instance_id("node-a")
        assert outbox.new_event("system", "a.b").instance_id == "node-a"
    finally:
        outbox.events.set_instance_id(None)
    assert outbox.events.get_instance_id() != "node-a"
    with pytest.raises(outbox.OutboxError):
        outbox.events.set_instance_id("  ")


def test_copy_is_deep_and_transient() -> None:
    ev = outbox.new_event("system", "a.b", {"nested": {"k": [1, 2]}})
    clone = ev.copy()
    clone.payload["nested"]["k"].append(3)
    assert ev.payload == {"nested": {"k": [1, 2]}}
    assert clone.id == ev.id and clone.type == ev.type


def test_to_dict_round_trip_uses_column_names() -> None:
    ev = outbox.new_event("system", "a.b", {"v": 1}, metadata={"m": True})
    data = ev.to_dict()
    assert "metadata" in data and "meta" not in data
    back = Event.from_dict(data)
    assert back.to_dict() == data
    with pytest.raises(ValueError, match="unknown event fields"):
        Event.from_dict({**data, "bogus": 1})


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2026, 1, 2, 3, 4, 5, 6), "2026-01-02T03:04:05.000006"),
        (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "2026-01-02T03:04:05+00:00"),
        (dt.date(2026, 1, 2), "2026-01-02"),
        (dt.time(3, 4, 5), "03:04:05"),
        (Decimal("1.10"), "1.10"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (Color.RED, "red"),
        (b"\x00\xff", "AP8="),
        (dt.timedelta(seconds=90), 90.0),
        ({"a": (1, 2)}, {"a": [1, 2]}),
        (None, None),
        (True, True),
    ],
)
def test_to_jsonable(value: object, expected: object) -> None:
    assert _json.to_jsonable(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), {object(): 1}])
def test_to_jsonable_refuses(value: object) -> None:
    with pytest.raises(_json.NotSerialisable):
        _json.to_jsonable(value)


def test_fast_json_falls_back_to_the_standard_library_for_what_orjson_refuses() -> None:
    """Integers beyond 64 bits (jsonb keeps them): the same text and values either way."""
    import json

    from outbox import _json

    big = {"n": 2**70, "s": "é", "l": [1.5, None, True]}
    text = _json.dumps_safe(big)
    assert text == json.dumps(big, separators=(",", ":"), ensure_ascii=False)
    assert _json.loads(text) == big
    assert _json.loads(text.encode()) == big
    small = {"a": [1, 2, {"b": "c"}], "é": 0.1}
    assert _json.dumps_safe(small) == json.dumps(small, separators=(",", ":"), ensure_ascii=False)

"""The CloudEvents wire codec: lossless round trip, readable by the public cloudevents SDK."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox import new_event, wire
from outbox.events import Event
from outbox.exceptions import MalformedMessage

CARRIED = ("id", "seq", "source", "type", "payload", "user_id", "session_id", "instance_id",
           "schema_name", "entity", "entity_id", "operation", "created_at", "metadata",
           "ordering_key")


def _full_event(**overrides: Any) -> Event:
    values: dict[str, Any] = dict(
        source="database", type="public.users.update", payload={"id": 7, "name": "Ada"},
        user_id=42, session_id="sess-1", instance_id="web-1/pod 3", schema_name="public",
        entity="users", entity_id='[7,"x"]', operation="update",
        metadata={"changes": {"name": {"old": "A", "new": "Ada"}},
                  "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                  "tracestate": "congo=t61rcWkgMzE"},
        ordering_key="public.users:7",
        created_at=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
    )
    values.update(overrides)
    event = new_event(**values)
    event.seq = 123456789012
    return event


def _carried(event: Event) -> dict[str, Any]:
    data = event.to_dict()
    return {k: data[k] for k in CARRIED}


def test_round_trip_keeps_every_carried_field() -> None:
    event = _full_event()
    back = wire.decode(wire.encode(event))
    assert _carried(back) == _carried(event)
    assert back.status == "pending" and back.retry_count == 0
    assert back.next_attempt_at == event.created_at


def test_document_shape_follows_spec_section_7() -> None:
    event = _full_event()
    doc = json.loads(wire.encode(event))
    assert doc["specversion"] == "1.0"
    assert doc["id"] == str(event.id)
    assert doc["source"] == "/outbox/web-1%2Fpod%203/database"
    assert doc["type"] == "public.users.update"
    assert doc["time"] == "2024-05-06T07:08:09.123456Z"
    assert doc["datacontenttype"] == "application/json"
    assert doc["data"] == {"id": 7, "name": "Ada"}
    assert doc["sequence"] == "00000000123456789012"
    assert (doc["userid"], doc["sessionid"], doc["schemaname"], doc["entity"], doc["entityid"],
            doc["operation"], doc["partitionkey"]) == (
        "42", "sess-1", "public", "users", '[7,"x"]', "update", "public.users:7")
    assert doc["traceparent"].startswith("00-0af765")
    assert doc["tracestate"] == "congo=t61rcWkgMzE"
    assert json.loads(doc["metadata"])["changes"]["name"]["new"] == "Ada"
    # Relay bookkeeping stays home.
    for name in ("status", "retrycount", "error", "processedat", "leaseowner"):
        assert name not in doc
    for name in doc:
        assert name.isalnum() and name.islower(), name


def test_absent_values_are_omitted() -> None:
    event = new_event(source="system", type="tick", payload=None)
    doc = json.loads(wire.encode(event))
    for name in ("sequence", "userid", "sessionid", "entity", "metadata", "traceparent"):
        assert name not in doc
    back = wire.decode(json.dumps(doc))
    assert back.seq is None and back.user_id is None and back.meta == {}
    assert back.payload == {}


def test_cloudevents_sdk_reads_what_we_write() -> None:
    event = _full_event()
    ce = JSONFormat().read(None, wire.encode(event))
    attrs = ce.get_attributes()
    assert attrs["id"] == str(event.id)
    assert attrs["type"] == event.type
    assert attrs["time"] == event.created_at
    assert attrs["userid"] == "42"
    assert ce.get_data() == event.payload
    # And our decoder reads what the SDK writes (its own serialisation of the same event).
    again = wire.decode(JSONFormat().write(ce))
    assert _carried(again) == _carried(event)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a CloudEvent object"),
        (b'{"specversion": "0.3", "id": "x", "source": "s", "type": "t"}', "specversion"),
        (b'{"id": "x", "source": "s", "type": "t"}', "specversion"),
        (b'{"specversion": "1.0", "source": "s", "type": "t"}', "'id'"),
        (b'{"specversion": "1.0", "id": "nope", "source": "s", "type": "t"}', "not a UUID"),
        (b'{"specversion": "1.0", "id": "%s", "type": "t"}', "'source'"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s"}', "'type'"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": ""}', "'type' is empty"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": ["x"]}', "must be a string"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t", "time": "yesterday"}',
         "RFC 3339"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t",'
         b' "time": "2024-01-01T00:00:00"}', "UTC offset"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t", "sequence": "x1"}',
         "sequence"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t", "metadata": "{"}',
         "metadata"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t", "metadata": "[1]"}',
         "JSON object"),
        (b'{"specversion": "1.0", "id": "%s", "source": "s", "type": "t", "data_base64": "AA=="}',
         "binary"),
    ],
)
def test_malformed_documents_name_the_problem(raw: bytes, message: str) -> None:
    if b"%s" in raw:
        raw = raw.replace(b"%s", str(uuid.uuid4()).encode())
    with pytest.raises(MalformedMessage, match=message):
        wire.decode(raw)


def test_foreign_cloudevent_is_accepted() -> None:
    event_id = uuid.uuid4()
    doc = {
        "specversion": "1.0", "id": str(event_id), "source": "https://billing.example/x",
        "type": "invoice.paid", "time": "2024-01-01T10:00:00.123456789Z", "data": [1, 2],
        "userid": 17, "traceparent": "00-abc-def-01",
    }
    event = wire.decode(json.dumps(doc))
    assert event.id == event_id
    assert event.source == "https://billing.example/x" and event.instance_id == ""
    assert event.created_at == dt.datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
    assert event.payload == [1, 2]
    assert event.user_id == "17"
    assert event.meta == {"traceparent": "00-abc-def-01"}


def test_encoding_an_incomplete_event_is_refused() -> None:
    with pytest.raises(MalformedMessage, match="needs an id"):
        wire.encode(Event(source="system", type="x"))


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    payload=st.dictionaries(_text, _json_values, max_size=5),
    metadata=st.dictionaries(_text, _json_values, max_size=3),
    source=_text, instance_id=_text, type_=_text,
    user_id=st.none() | _text, entity_id=st.none() | _text, ordering_key=st.none() | _text,
    seq=st.none() | st.integers(1, 2**63 - 1),
    created_at=st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(9000, 1, 1),
                            timezones=st.just(dt.UTC)),
)
def test_round_trip_property(payload: dict[str, Any], metadata: dict[str, Any], source: str,
                             instance_id: str, type_: str, user_id: str | None,
                             entity_id: str | None, ordering_key: str | None, seq: int | None,
                             created_at: dt.datetime) -> None:
    event = new_event(source=source, type=type_, payload=payload, metadata=metadata,
                      instance_id=instance_id, user_id=user_id, entity_id=entity_id,
                      ordering_key=ordering_key, created_at=created_at)
    event.seq = seq
    assert _carried(wire.decode(wire.encode(event))) == _carried(event)

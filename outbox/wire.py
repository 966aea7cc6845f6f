"""The wire format: an :class:`~outbox.Event` as a CloudEvents 1.0 structured JSON document.

This is what the relay forwards to Redis Streams and NATS JetStream and what consumers parse back;
any CloudEvents SDK reads it.

===================  =========================================  =================================
event field          CloudEvents attribute                      notes
===================  =========================================  =================================
id                   ``id``                                     UUID text; the idempotency key
type                 ``type``
source, instance_id  ``source`` = ``/outbox/{instance_id}/{source}``  both percent-encoded
created_at           ``time``                                   RFC 3339, UTC, microseconds
payload              ``data``                                   ``datacontenttype`` application/json
seq                  ``sequence``                               20-digit zero-padded decimal
                                                                (CloudEvents *sequence* extension:
                                                                compares lexicographically)
user_id              ``userid``
session_id           ``sessionid``
schema_name          ``schemaname``
entity               ``entity``
entity_id            ``entityid``
operation            ``operation``
ordering_key         ``partitionkey``                           CloudEvents *partitioning* ext.
metadata             ``metadata``                               compact JSON object as a string
                                                                (extension values are scalars)
metadata.traceparent ``traceparent``, ``tracestate``            CloudEvents *distributed tracing*
metadata.tracestate                                             extension, when present
===================  =========================================  =================================

Absent (``None``) values are omitted, as CloudEvents requires. Extension names are lowercase
alphanumeric, per the CloudEvents naming rules.

Not carried: the relay's bookkeeping in the source database (``status``, ``processed_at``,
``completed_at``, ``error``, ``retry_count``, ``next_attempt_at``, ``lease_*``, ``txid``). They
describe one relay's progress with the row, are stale the moment the document is written (the relay
marks the row completed *after* forwarding) and mean nothing to another service. A decoded event is
therefore ``pending`` with ``retry_count`` 0 and ``next_attempt_at`` = ``created_at``: a new event
for the consumer that receives it.

Documents from other producers are accepted when they are valid CloudEvents 1.0 JSON with a UUID
``id``: a ``source`` that is not ``/outbox/{instance}/{source}`` becomes the event's ``source``
verbatim with an empty ``instance_id``. Anything else raises :class:`MalformedMessage`
naming what is wrong; providers park such messages instead of crashing or blocking a consumer.
"""

from __future__ import annotations

import datetime as dt
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote

from outbox import _json
from outbox.events import Event, EventStatus
from outbox.exceptions import MalformedMessage

__all__ = [
    "CONTENT_TYPE",
    "EXTENSIONS",
    "SPECVERSION",
    "decode",
    "encode",
    "source_uri",
    "to_cloudevent_dict",
]

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
#: Media type of a whole structured-mode document (what a NATS header / HTTP body would say).
DOCUMENT_CONTENT_TYPE = "application/cloudevents+json"
_SOURCE_PREFIX = "/outbox/"

#: Event attribute -> CloudEvents extension attribute (text values).
EXTENSIONS: dict[str, str] = {
    "user_id": "userid",
    "session_id": "sessionid",
    "schema_name": "schemaname",
    "entity": "entity",
    "entity_id": "entityid",
    "operation": "operation",
    "ordering_key": "partitionkey",
}
_SEQUENCE = "sequence"
_METADATA = "metadata"
_TRACE_KEYS = ("traceparent", "tracestate")
_SEQ_WIDTH = 20  # a bigint has at most 19 digits; fixed width keeps lexicographic order

_dumps = _json.dumps_safe


@lru_cache(maxsize=1024)
def source_uri(instance_id: str, source: str) -> str:
    """``/outbox/{instance_id}/{source}``, each part percent-encoded (cached: few distinct)."""
    return f"{_SOURCE_PREFIX}{quote(instance_id, safe='')}/{quote(source, safe='')}"


def _time(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    text = value.astimezone(dt.UTC).isoformat()
    return text[:-6] + "Z"  # "+00:00" -> "Z"


def to_cloudevent_dict(event: Event) -> dict[str, Any]:
    """The CloudEvents document of ``event`` as a dict (mapping: the module docstring)."""
    state = event.__dict__  # plain attribute reads; the relay encodes thousands per second
    event_id, source, event_type = state.get("id"), state.get("source"), state.get("type")
    if event_id is None or not source or not event_type:
        raise MalformedMessage("an event needs an id, a source and a type to be forwarded "
                               f"(id={event_id!r}, source={source!r}, type={event_type!r})")
    doc: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": str(event_id),
        "source": source_uri(state.get("instance_id") or "", source),
        "type": event_type,
        "time": _time(state.get("created_at") or dt.datetime.now(dt.UTC)),
        "datacontenttype": CONTENT_TYPE,
        "data": state.get("payload"),
    }
    seq = state.get("seq")
    if seq is not None:
        doc[_SEQUENCE] = str(int(seq)).zfill(_SEQ_WIDTH)
    for attr, name in EXTENSIONS.items():
        value = state.get(attr)
        if value is not None:
            doc[name] = str(value)
    meta = state.get("meta")
    if meta:
        doc[_METADATA] = _dumps(meta)
        for key in _TRACE_KEYS:
            value = meta.get(key)
            if isinstance(value, str) and value:
                doc[key] = value
    return doc


def encode(event: Event) -> bytes:
    """``event`` as a CloudEvents 1.0 structured JSON document (UTF-8 bytes)."""
    try:
        return _dumps(to_cloudevent_dict(event)).encode()
    except (TypeError, ValueError) as exc:
        # Payloads loaded from the table are JSON already; this is a hand-built event.
        raise MalformedMessage(f"event {event.__dict__.get('id')} cannot be encoded as JSON: "
                               f"{exc}") from exc


# --------------------------------------------------------------------------------------------
# decoding


def _text(doc: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise MalformedMessage(f"CloudEvent has no {name!r} attribute")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedMessage(f"CloudEvent attribute {name!r} must be a string, "
                               f"not {type(value).__name__}")
    text = str(value)
    if required and not text:
        raise MalformedMessage(f"CloudEvent attribute {name!r} is empty")
    return text


def _split_source(ce_source: str) -> tuple[str, str]:
    """(instance_id, source) from ``/outbox/{instance}/{source}``; foreign sources verbatim."""
    if ce_source.startswith(_SOURCE_PREFIX):
        parts = ce_source[len(_SOURCE_PREFIX):].split("/")
        if len(parts) == 2 and parts[1]:
            return unquote(parts[0]), unquote(parts[1])
    return "", ce_source


def _parse_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.upper())
    except ValueError:
        raise MalformedMessage(f"CloudEvent 'time' {text[:64]!r} is not an RFC 3339 "
                               "timestamp") from None
    if value.tzinfo is None:
        raise MalformedMessage(f"CloudEvent 'time' {text[:64]!r} has no UTC offset")
    return value.astimezone(dt.UTC)


def decode(raw: bytes | bytearray | memoryview | str) -> Event:
    """Parse a CloudEvents 1.0 structured JSON document back into a transient :class:`Event`.

    Raises :class:`MalformedMessage` saying what is wrong (not JSON, not an object, wrong
    ``specversion``, missing or invalid ``id``/``source``/``type``, bad ``time``/``sequence``/
    ``metadata``, binary ``data_base64``).
    """
    try:
        doc = _json.loads(bytes(raw) if isinstance(raw, bytearray | memoryview) else raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"message is JSON {type(doc).__name__}, not a CloudEvent object")
    specversion = doc.get("specversion")
    if specversion != SPECVERSION:
        raise MalformedMessage(f"CloudEvent specversion {specversion!r} is not '1.0'")
    id_text = _text(doc, "id", required=True)
    assert id_text is not None
    try:
        event_id = uuid.UUID(id_text)
    except ValueError:
        raise MalformedMessage(f"CloudEvent id {id_text[:64]!r} is not a UUID") from None
    ce_source = _text(doc, "source", required=True)
    event_type = _text(doc, "type", required=True)
    assert ce_source is not None and event_type is not None
    instance_id, source = _split_source(ce_source)

    time_text = _text(doc, "time", required=False)
    created_at = _parse_time(time_text) if time_text else dt.datetime.now(dt.UTC)

    if "data" in doc:
        payload = doc["data"]
    elif "data_base64" in doc:
        raise MalformedMessage("CloudEvent carries binary data (data_base64); outbox events "
                               "carry JSON data")
    else:
        payload = {}

    seq: int | None = None
    seq_value = doc.get(_SEQUENCE)
    if seq_value is not None:
        if isinstance(seq_value, int) and not isinstance(seq_value, bool):
            seq = seq_value
        elif isinstance(seq_value, str) and seq_value.isdigit():
            seq = int(seq_value)
        else:
            raise MalformedMessage(f"CloudEvent 'sequence' {seq_value!r} is not a decimal number")

    meta: dict[str, Any] = {}
    meta_value = doc.get(_METADATA)
    if meta_value is not None:
        if isinstance(meta_value, str):
            try:
                meta_value = _json.loads(meta_value)
            except ValueError:
                raise MalformedMessage("CloudEvent 'metadata' is not JSON text") from None
        if not isinstance(meta_value, dict):
            raise MalformedMessage("CloudEvent 'metadata' must be a JSON object")
        meta = meta_value
    for key in _TRACE_KEYS:  # foreign producers set trace context without our metadata
        trace = doc.get(key)
        if isinstance(trace, str) and trace and key not in meta:
            meta[key] = trace

    values: dict[str, Any] = {
        "id": event_id,
        "seq": seq,
        "source": source,
        "type": event_type,
        "status": EventStatus.PENDING.value,
        "payload": payload,
        "instance_id": instance_id,
        "created_at": created_at,
        "next_attempt_at": created_at,
        "meta": meta,
        "retry_count": 0,
    }
    for attr, name in EXTENSIONS.items():
        values[attr] = _text(doc, name, required=False)
    return Event._from_values(values)

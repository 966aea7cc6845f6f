"""Event types as NATS subjects: ``{subject_prefix}.{source}.{type}``, and patterns as filters.

With ``nats.partitions`` N > 1 the partition of the event's ordering key
(:func:`~outbox.providers._bus.shard_of`) comes after the prefix:
``{subject_prefix}.{partition}.{source}.{type}``.
"""

from __future__ import annotations

import re

from outbox._patterns import compile_pattern
from outbox.events import Event
from outbox.exceptions import ProviderError
from outbox.providers._bus import shard_of

__all__ = ["TOKEN", "check_subject_part", "filter_subject", "subject_of"]

#: One subject token: no whitespace, '.', '*' or '>'.
TOKEN = re.compile(r"[^\s.*>]+")


def filter_subject(subject_prefix: str, pattern: str, *, partitions: int = 1,
                   partition: int | None = None) -> str:
    """The JetStream subject filter of ``pattern`` (which matches the event *type*).

    Subjects are ``{prefix}.{source}.{type}``: any source, then the pattern with ``*`` and ``>``
    kept (they mean the same in NATS); the match-all ``*`` becomes ``{prefix}.>``. With
    ``partitions`` > 1, ``{prefix}.{partition}.…`` (any partition when ``partition`` is None).
    """
    if partitions > 1:
        subject_prefix = f"{subject_prefix}.{'*' if partition is None else partition}"
    compiled = compile_pattern(pattern)
    if compiled.match_all:
        return f"{subject_prefix}.>"
    return f"{subject_prefix}.*.{pattern}"


def check_subject_part(what: str, value: str) -> None:
    """:class:`ProviderError` unless ``value`` is one or more valid subject tokens."""
    for token in value.split("."):
        if not TOKEN.fullmatch(token):
            raise ProviderError(
                f"event {what} {value!r} cannot be part of a NATS subject (empty segment, "
                "whitespace, '*' or '>')"
            )


def subject_of(subject_prefix: str, event: Event, partitions: int = 1) -> str:
    """``{subject_prefix}.{source}.{type}``, with ``partitions`` > 1
    ``{subject_prefix}.{partition}.{source}.{type}`` (ProviderError when not a valid subject)."""
    source, type_ = event.source, event.type
    check_subject_part("source", source or "")
    check_subject_part("type", type_ or "")
    if partitions > 1:
        return f"{subject_prefix}.{shard_of(event, partitions)}.{source}.{type_}"
    return f"{subject_prefix}.{source}.{type_}"

"""Event types as NATS subjects: ``{subject_prefix}.{source}.{type}``, and patterns as filters."""

from __future__ import annotations

import re

from outbox._patterns import compile_pattern
from outbox.events import Event
from outbox.exceptions import ProviderError

__all__ = ["TOKEN", "check_subject_part", "filter_subject", "subject_of"]

#: One subject token: no whitespace, '.', '*' or '>'.
TOKEN = re.compile(r"[^\s.*>]+")


def filter_subject(subject_prefix: str, pattern: str) -> str:
    """The JetStream subject filter of ``pattern`` (which matches the event *type*).

    Subjects are ``{prefix}.{source}.{type}``: any source, then the pattern with ``*`` and ``>``
    kept (they mean the same in NATS); the match-all ``*`` becomes ``{prefix}.>``.
    """
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


def subject_of(subject_prefix: str, event: Event) -> str:
    """``{subject_prefix}.{source}.{type}`` (ProviderError when not a valid subject)."""
    source, type_ = event.source, event.type
    check_subject_part("source", source or "")
    check_subject_part("type", type_ or "")
    return f"{subject_prefix}.{source}.{type_}"

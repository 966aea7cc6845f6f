"""Pattern syntax: ``*``, one-segment ``*``, a final ``>``, literal segments."""

from __future__ import annotations

import pytest

from outbox._patterns import compile_pattern, matches


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        ("*", "test.event", True),
        ("*", "a", True),
        ("test.*", "test.event", True),
        ("test.event", "test.event", True),
        ("test.*", "test.event.x", False),
        ("public.*.create", "public.users.create", True),
        ("public.*.create", "public.users.x.create", False),
        ("public.>", "public.users", True),
        ("public.>", "public.users.create", True),
        ("public.>", "public", False),
        (">", "anything.at.all", True),
        ("*.*.create", "public.users.create", True),
        ("*.*.create", "public.users.update", False),
    ],
)
def test_matching(pattern: str, event_type: str, expected: bool) -> None:
    assert matches(pattern, event_type) is expected


@pytest.mark.parametrize("pattern", ["", "a..b", ".a", "a.", "a.>.b", "a.b c", "a.b$", "a.**"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid pattern"):
        compile_pattern(pattern)

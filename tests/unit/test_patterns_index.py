"""SubscriptionIndex: the trie returns exactly what a linear scan would, in subscription order."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox._patterns import SubscriptionIndex, compile_pattern

SEGMENTS = st.sampled_from(["a", "b", "c", "users", "x-1"])
PATTERN_SEGMENTS = st.sampled_from(["a", "b", "c", "users", "x-1", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 12)) == 0:
        return "*"
    parts = draw(st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append(">")
    return ".".join(parts)


TYPES = st.lists(SEGMENTS, min_size=1, max_size=5).map(".".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), max_size=30), st.lists(TYPES, min_size=1, max_size=10))
def test_index_agrees_with_linear_scan(pats: list[str], types: list[str]) -> None:
    index: SubscriptionIndex[int, int] = SubscriptionIndex()
    for i, p in enumerate(pats):
        index.add(i, p, i)
    for t in types:
        expected = tuple(i for i, p in enumerate(pats) if compile_pattern(p).matches(t))
        assert index.match(t) == expected
        assert index.match_uncached(t) == expected
        assert index.match(t) == expected  # cached answer


@settings(max_examples=150, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=20), st.data())
def test_removal_keeps_the_rest(pats: list[str], data: st.DataObject) -> None:
    index: SubscriptionIndex[int, int] = SubscriptionIndex()
    for i, p in enumerate(pats):
        index.add(i, p, i)
    removed = data.draw(st.sets(st.sampled_from(range(len(pats)))))
    for t in ("a", "a.b", "users.a.b"):
        index.match(t)  # fill the cache before removing
    for i in removed:
        assert index.remove(i) == i
    for t in ("a", "a.b", "users.a.b", "x-1.c.b.a"):
        expected = tuple(
            i for i, p in enumerate(pats) if i not in removed and compile_pattern(p).matches(t)
        )
        assert index.match(t) == expected
    assert len(index) == len(pats) - len(removed)


def test_seed_example_all_three_receive() -> None:
    index: SubscriptionIndex[str, str] = SubscriptionIndex()
    for p in ("*", "test.*", "test.event", "other.*"):
        index.add(p, p, p)
    assert index.match("test.event") == ("*", "test.*", "test.event")


def test_removing_prunes_empty_branches() -> None:
    index: SubscriptionIndex[int, str] = SubscriptionIndex()
    index.add(1, "a.b.c.d", "x")
    index.add(2, "a.*.>", "y")
    index.remove(1)
    index.remove(2)
    assert index._root.empty()
    assert index.match("a.b.c.d") == ()


def test_duplicate_key_and_bad_pattern_are_refused() -> None:
    index: SubscriptionIndex[int, str] = SubscriptionIndex()
    index.add(1, "a", "x")
    with pytest.raises(ValueError, match="already"):
        index.add(1, "b", "y")
    with pytest.raises(ValueError, match="invalid pattern"):
        index.add(2, "a..b", "y")
    assert 2 not in index
    with pytest.raises(KeyError):
        index.remove(3)


def test_cache_is_bounded() -> None:
    index: SubscriptionIndex[int, str] = SubscriptionIndex(cache_size=8)
    index.add(1, "*", "all")
    for i in range(100):
        assert index.match(f"t.{i}") == ("all",)
    assert len(index._cache) <= 8


def test_concurrent_subscribe_and_match() -> None:
    index: SubscriptionIndex[int, int] = SubscriptionIndex()
    index.add(-1, "a.>", -1)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(300):
                index.add(offset + i, "a.*", offset + i)
                index.remove(offset + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(2000):
                found = index.match("a.b")
                assert found[0] == -1  # the permanent subscription is always there, first
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert index.match("a.b") == (-1,)

"""The relay's garbage-collector threshold: raised while relays run, put back after the last."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from outbox import Broker
from outbox.relay import Relay, RelayHooks
from outbox.relay._gc import young_gc_threshold


@pytest.fixture(autouse=True)
def default_threshold() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_raised_inside_and_restored_after() -> None:
    with young_gc_threshold(5000):
        assert gc.get_threshold() == (5000, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_nested_users_restore_only_after_the_last() -> None:
    with young_gc_threshold(5000):
        with young_gc_threshold(5000):
            assert gc.get_threshold()[0] == 5000
        assert gc.get_threshold()[0] == 5000  # the outer relay still runs
    assert gc.get_threshold()[0] == 700


def test_none_higher_or_disabled_thresholds_are_left_alone() -> None:
    with young_gc_threshold(None):
        assert gc.get_threshold()[0] == 700
    gc.set_threshold(20000, 10, 10)
    with young_gc_threshold(5000):
        assert gc.get_threshold()[0] == 20000
    assert gc.get_threshold()[0] == 20000
    gc.set_threshold(0, 10, 10)
    with young_gc_threshold(5000):
        assert gc.get_threshold()[0] == 0


def test_a_change_made_meanwhile_is_kept() -> None:
    with young_gc_threshold(5000):
        gc.set_threshold(1234, 10, 10)
    assert gc.get_threshold()[0] == 1234


def test_relay_run_raises_it_while_running(tmp_path: Path) -> None:
    seen: list[int] = []
    relay = Relay(f"sqlite:///{tmp_path}/outbox.db", broker=Broker(), provider=None)

    class Probe(RelayHooks):
        def on_claim(self, claim: Any) -> None:
            seen.append(gc.get_threshold()[0])

    relay.hooks.append(Probe())
    anyio.run(relay.drain)
    assert seen and all(t == relay.gc_threshold for t in seen)
    assert gc.get_threshold()[0] == 700

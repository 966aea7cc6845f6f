"""HealthState: liveness and readiness decisions (a fake clock, no servers)."""

from __future__ import annotations

import logging

import anyio
import pytest

from outbox.health import HealthMonitor, HealthState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_not_alive_nor_ready_before_first_beat() -> None:
    state = HealthState(clock=Clock())
    assert state.liveness()[0] is False
    ok, doc = state.readiness()
    assert ok is False and doc["loop"]["detail"] == "no heartbeat yet"


def test_expected_checks_block_readiness_until_reported() -> None:
    clock = Clock()
    state = HealthState(clock=clock, expected=["database", "provider"])
    state.beat()
    ok, doc = state.readiness()
    assert not ok and doc["checks"]["database"]["detail"] == "not checked yet"
    state.set("database", True)
    state.set("provider", True)
    assert state.readiness()[0] and state.liveness()[0]


def test_stalled_loop_fails_both() -> None:
    clock = Clock()
    state = HealthState(clock=clock, stall_after=10)
    state.beat()
    state.set("database", True)
    clock.now += 11
    alive, doc = state.liveness()
    assert not alive and doc["loop"]["detail"] == "event loop stalled"
    assert not state.readiness()[0]
    state.beat()
    assert state.liveness()[0] and state.readiness()[0]


def test_failing_database_fails_readiness_at_once_and_liveness_after_grace() -> None:
    clock = Clock()
    state = HealthState(clock=clock, unhealthy_after=60)
    state.beat()
    state.set("database", False, "OperationalError: refused")
    assert not state.readiness()[0]
    assert state.liveness()[0]
    clock.now += 30
    state.beat()
    state.set("database", False, "still refused")  # same state: 'since' is kept
    clock.now += 31
    state.beat()
    alive, doc = state.liveness()
    assert not alive and doc["failing_too_long"] == ["database"]
    state.set("database", True)
    assert state.liveness()[0] and state.readiness()[0]


def test_non_critical_check_never_fails_liveness() -> None:
    clock = Clock()
    state = HealthState(clock=clock, unhealthy_after=1)
    state.beat()
    state.set("provider", False, "outage")
    clock.now += 100
    state.beat()
    assert state.liveness()[0]
    assert not state.readiness()[0]


@pytest.mark.anyio
async def test_monitor_records_check_outcomes_and_timeouts() -> None:
    state = HealthState()
    calls: list[str] = []

    async def good() -> None:
        calls.append("good")

    async def bad() -> None:
        raise ConnectionRefusedError("connection refused\nsecond line")

    async def hangs() -> None:
        await anyio.sleep_forever()

    monitor = HealthMonitor(state, {"good": good, "bad": bad, "slow": hangs}, timeout=0.05)
    assert await monitor.check_once() is False
    checks = state.checks()
    assert checks["good"].ok and calls == ["good"]
    assert not checks["bad"].ok and checks["bad"].detail == \
        "ConnectionRefusedError: connection refused"
    assert not checks["slow"].ok and "timed out" in checks["slow"].detail


@pytest.mark.anyio
async def test_monitor_logs_failures_with_their_reason_when_they_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing check is logged with why, once while it fails the same way (not every
    interval), again when the reason changes, and recovery is said too."""
    state = HealthState()
    reason = ["connection refused"]

    async def provider() -> None:
        if reason:
            raise ConnectionRefusedError(reason[0])

    monitor = HealthMonitor(state, {"provider": provider})
    with caplog.at_level(logging.INFO, logger="outbox.health"):
        for _ in range(3):
            await monitor.check_once()
        reason[0] = "no route to host"
        await monitor.check_once()
        await monitor.check_once()
        reason.clear()
        await monitor.check_once()
        await monitor.check_once()
    assert [r.getMessage() for r in caplog.records] == [
        "readiness checks failing: provider (ConnectionRefusedError: connection refused)",
        "readiness checks failing: provider (ConnectionRefusedError: no route to host)",
        "readiness checks passing again",
    ]

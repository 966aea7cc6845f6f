"""RetryPolicy delays."""

from __future__ import annotations

import random

import pytest

from outbox import RetryPolicy


def test_defaults_follow_the_seed() -> None:
    p = RetryPolicy()
    assert (p.max_retries, p.initial_delay, p.max_delay, p.backoff_factor) == (3, 1.0, 30.0, 2.0)
    assert p.max_attempts == 4


def test_exponential_and_capped_without_jitter() -> None:
    p = RetryPolicy(initial_delay=1, max_delay=5, backoff_factor=2, jitter=0)
    assert [p.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert p.delay(10_000) == 5


def test_jitter_stays_within_bounds() -> None:
    p = RetryPolicy(initial_delay=2, max_delay=30, jitter=0.1)
    rng = random.Random(1)
    for _ in range(200):
        assert 1.8 <= p.delay(1, rng) <= 2.2


@pytest.mark.parametrize(
    "kwargs",
    [{"max_retries": -1}, {"initial_delay": -1}, {"max_delay": 0.5}, {"backoff_factor": 0.5},
     {"jitter": 2}],
)
def test_invalid(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="retry_policy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]

"""Retry policy: how often and how long to wait before trying a failed handler or event again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped.

    Defaults: 3 retries, 1 s before the first, doubling, at most 30 s, ±10 % jitter.

    ``max_retries`` counts retries after the first attempt: ``max_retries=2`` means at most three
    attempts. The delay before retry ``n`` (1-based) is
    ``min(max_delay, initial_delay * backoff_factor ** (n - 1))``, then spread by ``±jitter`` (a
    fraction of the delay) and capped at ``max_delay`` again.
    """

    max_retries: int = 3
    initial_delay: float = 1.0
    max_delay: float = 30.0
    backoff_factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError("retry_policy.max_retries must be an integer >= 0")
        if self.initial_delay < 0:
            raise ValueError("retry_policy.initial_delay must be >= 0")
        if self.max_delay < self.initial_delay:
            raise ValueError("retry_policy.max_delay must be >= initial_delay")
        if self.backoff_factor < 1:
            raise ValueError("retry_policy.backoff_factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry_policy.jitter must be between 0 and 1")

    @property
    def max_attempts(self) -> int:
        """Total attempts allowed: the first one plus ``max_retries``."""
        return self.max_retries + 1

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 = first retry)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        exponent = min(retry - 1, 64)  # avoid float overflow for huge retry counts
        base = min(self.max_delay, self.initial_delay * self.backoff_factor**exponent)
        if self.jitter and base:
            spread = base * self.jitter
            base += (rng or random).uniform(-spread, spread)
        return max(0.0, min(self.max_delay, base))

    def exhausted(self, failures: int) -> bool:
        """True when ``failures`` failed attempts leave no retry."""
        return failures > self.max_retries

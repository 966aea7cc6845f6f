"""What the relay reports: counters and state (:class:`RelayStats`), and hooks for metrics.

Metrics attach by passing a :class:`RelayHooks` subclass to ``Relay(hooks=[...])`` or by
reading ``relay.stats``; the loop itself never imports prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from outbox._sql.relay import Claim, Outcome

__all__ = ["RelayHooks", "RelayStats"]


@dataclass(slots=True)
class RelayStats:
    """Counters since start, and the relay's current state."""

    owner: str = ""
    started_at: float = field(default_factory=time.time)
    claims: int = 0  # claim transactions run (also empty ones)
    claimed: int = 0  # events claimed
    followers_claimed: int = 0  # of which followers of a key claimed in the same transaction
    claim_seconds_total: float = 0.0
    last_claim_seconds: float = 0.0
    batches: int = 0  # non-empty batches processed
    handled: int = 0  # events whose local handlers all succeeded
    forwarded: int = 0  # events the provider accepted
    completed: int = 0
    retried: int = 0  # events sent back to pending with retry_count + 1
    failed: int = 0  # events that exhausted their retries
    released: int = 0  # hand-backs of unstarted or unfinished events (not a retry; per time)
    handler_errors: int = 0  # events with at least one failing handler
    forward_errors: int = 0  # events the provider refused (errors about that event)
    outages: int = 0  # provider outages (ProviderUnavailable) seen
    lease_lost: int = 0  # events whose lease another relay took over before we settled them
    recovered: int = 0  # expired leases of other (dead) relays handed back to pending
    notifications: int = 0  # NOTIFY wake-ups received
    listener_connected: bool = False
    ready: bool = False  # database reachable and provider accepting
    healthy: bool = True  # the loop is running
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


class RelayHooks:
    """Callbacks the relay calls from its loop; override what you need (all no-ops here).

    Called on the relay's event loop; keep them quick and never raise.
    """

    def on_claim(self, claim: Claim) -> None:
        """After every claim transaction (``claim.events`` may be empty)."""

    def on_settled(self, outcomes: Sequence[Outcome], lost: int) -> None:
        """After a batch's outcomes were written (``lost``: events whose lease was taken over)."""

    def on_forward_error(self, error: BaseException, count: int) -> None:
        """The provider refused ``count`` events of a batch with errors about those events."""

    def on_outage(self, error: BaseException | None) -> None:
        """The provider became unreachable (``error``), or reachable again (``None``)."""

    def on_ready(self, ready: bool) -> None:
        """Readiness changed (database and provider reachable)."""

"""The relay: delivers committed events from the ``events`` table.

``Relay`` is the library entry point; ``python -m outbox.relay`` runs it as a sidecar. The SQL of
every dialect is in :mod:`outbox._sql.relay`, the batch processing (handlers, provider, per-key
order, partial success) in :mod:`outbox.relay.dispatch`, the loop in :mod:`outbox.relay.relay`,
LISTEN in :mod:`outbox.relay.listener`. See docs/relay.md.
"""

from __future__ import annotations

from outbox._sql.relay import Claim, Outcome, RelayStore
from outbox.relay.relay import DEFAULT_DATABASE_URL, DatabaseUnavailable, Relay
from outbox.relay.stats import RelayHooks, RelayStats

__all__ = [
    "DEFAULT_DATABASE_URL",
    "Claim",
    "DatabaseUnavailable",
    "Outcome",
    "Relay",
    "RelayHooks",
    "RelayStats",
    "RelayStore",
]

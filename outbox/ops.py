"""The operator's jobs over the outbox tables, as functions (what ``python -m outbox``, the
console and the relay's metrics run):

- :func:`list_events` / :func:`get_event` — the audit trail by :class:`~outbox.EventFilter`;
- :func:`replay` — ``failed`` → ``pending`` with a fresh retry budget, by ids or by filter;
- :func:`cleanup` — delete finished events older than a cutoff, in small batches;
- :func:`stats` / :func:`backlog` / :func:`blocked_keys` — counts, the outbox lag, the ordering
  keys a failed event holds back.

Their SQL is in :mod:`outbox._sql.operator`.
"""

from __future__ import annotations

from outbox._sql import operator as _operator
from outbox._sql.operator import *  # noqa: F403 - the public names are the module's __all__

__all__ = list(_operator.__all__)

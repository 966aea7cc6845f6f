"""Run a short transaction again when the database says a concurrent one got in its way.

On PostgreSQL ``events`` is partitioned by status (docs/relay.md, "Storage"): a completion moves
its row from ``events_live`` to ``events_done``. A statement that wants to update, delete or lock
a row that a concurrent transaction has just moved cannot follow it to the other partition and
fails with SQLSTATE 40001, "tuple to be locked was already moved to another partition due to
concurrent update" (or "… updated …", "… deleted …"), even at READ COMMITTED. Run again, the
statement sees the row where it is now and decides on it afresh: a fenced settle finds another
relay's lease and changes nothing, a replay finds the event no longer failed. Deadlocks
(PostgreSQL 40P01, MySQL/MariaDB 1213) are retried the same way.

Only whole transactions are retried, and only those whose work is meant to be decided from what
the database holds at the time they run (every statement the relay and the operator commands
issue is written that way).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

__all__ = ["ATTEMPTS", "is_transient", "retrying"]

log = logging.getLogger("outbox")

_T = TypeVar("_T")

#: Attempts in all (the first and the retries) before the error is raised.
ATTEMPTS = 5
_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure (moved rows), deadlock
_MYSQL_CODES = frozenset({1213})  # deadlock


def is_transient(exc: BaseException) -> bool:
    """True for the errors a retry of the whole transaction resolves (see the module doc)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _MYSQL_CODES


def retrying(fn: Callable[[], _T], *, what: str, attempts: int = ATTEMPTS) -> _T:
    """``fn()``, run again (up to ``attempts`` times in all, after a few milliseconds) while it
    raises an error :func:`is_transient` accepts; ``fn`` must be one whole transaction."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except sa.exc.DBAPIError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            log.debug("%s: %s; running the transaction again (attempt %d)", what, reason,
                      attempt + 1)
            time.sleep(random.uniform(0.0, 0.002 * attempt))
    raise AssertionError("unreachable")  # pragma: no cover

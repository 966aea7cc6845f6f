"""``outbox.capture(...)``: an event row for every captured change, in the change's transaction.

What users rely on is in docs/capture.md; how it works, module by module, in
the order a change meets them:

- :mod:`~outbox._capture.registry` — ``capture(target)`` and :class:`Capture`: resolves the target
  (:mod:`~outbox._capture.targets`) to a sync ``Session`` class or instance, checks the arguments
  (:mod:`~outbox._capture.scope`), puts session listeners on it and, once per process, listeners
  on every ``Mapper``.
- :mod:`~outbox._capture.plan` — per model, once: the captured columns (secret-looking names left
  out, :mod:`~outbox._secret_names`), primary key, event types, JSON conversion; per column
  and dialect, what it stores for a value (:mod:`~outbox._capture.values`).
- :mod:`~outbox._capture.flush` — records each INSERT / UPDATE / DELETE the unit of work runs
  and, in ``after_flush``, writes their events with **one** statement on the flush's own
  connection. Commit writes the changes and their events together; a rollback, also to a
  savepoint, removes both.
- :mod:`~outbox._capture.statements` — the flush's own statements, row by row: association
  rows, per-row values of batched UPDATEs, DELETEs that matched nothing.
- :mod:`~outbox._capture.bulk` — ORM bulk ``insert()/update()/delete()`` run through the session:
  one event per affected row, by ``RETURNING``, or a refusal.
- :mod:`~outbox._capture.rows` — the event rows; :mod:`~outbox._sql.capture` — the
  statements that write them.
- :mod:`~outbox._capture.read` — read events (``"read"`` in ``operations``, not transactional).
- :mod:`~outbox._capture.sqlalchemy_internals` — the private SQLAlchemy attributes capture reads,
  where SQLAlchemy has no public API.

The package is private and named ``_capture`` so that nothing shadows the function
``outbox.capture``; its public names are re-exported from :mod:`outbox` (``capture``,
``Capture``) and :mod:`outbox.testing` (``captures``).
"""

from __future__ import annotations

from outbox._capture.bulk import OPT_OUT as BULK_OPT_OUT
from outbox._capture.registry import Capture, capture, captures

__all__ = ["BULK_OPT_OUT", "Capture", "capture", "captures"]

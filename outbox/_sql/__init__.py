"""Every SQL statement over the outbox tables, one module per concern.

- :mod:`~outbox._sql.ddl` — what the ``events`` table gets after ``CREATE TABLE`` on each dialect
  (PostgreSQL's partitions and their indexes, the wake-up trigger, ``seq`` numbering);
- :mod:`~outbox._sql.events` — events: insert, get, list by :class:`~outbox.EventFilter`, status
  updates, delete, counts;
- :mod:`~outbox._sql.relay` — the relay's claims, settles, lease renewal and recovery
  (:class:`~outbox._sql.relay.RelayStore`);
- :mod:`~outbox._sql.operator` — the operator's jobs: replay, cleanup, stats, backlog, blocked
  keys (``python -m outbox``, the relay's metrics);
- :mod:`~outbox._sql.console` — the console's pages (keyset pages, timelines, failure groups,
  health);
- :mod:`~outbox._sql.bus` — the database bus: consumer groups, reads below the watermark, claims,
  parking, rebase;
- :mod:`~outbox._sql.capture` — capture's insert of a flush's event rows;
- :mod:`~outbox._sql.inbox` — the consumers' inbox (handled event ids);
- :mod:`~outbox._sql.common` — helpers the others share.

Nothing outside this package writes SQL over these tables. Every value is a bound parameter.
"""

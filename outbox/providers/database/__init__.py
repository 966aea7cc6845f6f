"""The ``events`` table as the bus between instances.

``DatabaseProvider(engine)`` stores events in the events table and carries them to consumers in
other processes: ``consume(pattern, group=...)`` (consumer groups with a cursor per group in
``outbox_consumers``) and ``stream(pattern)``. Readers take batches between PostgreSQL snapshots,
so an event whose transaction commits late is never skipped and a long transaction holds back
only its own events. See ``docs/database-provider.md``.
"""

from outbox._sql.bus import ClusterChanged, GroupInfo
from outbox.providers.database.consumer import DatabaseDelivery
from outbox.providers.database.provider import DatabaseProvider, parse_start

__all__ = ["ClusterChanged", "DatabaseDelivery", "DatabaseProvider", "GroupInfo", "parse_start"]

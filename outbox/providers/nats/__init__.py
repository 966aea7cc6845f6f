"""NATS JetStream provider: ``NATSProvider`` (needs ``pip install 'sqlalchemy-outbox[nats]'``).

- :mod:`._provider` — :class:`NATSProvider`, the configuration and the ports;
- :mod:`._connection` — the connection, reconnects, the streams it needs, which errors are
  outages;
- :mod:`._subjects` — event types as subjects, patterns as subject filters;
- :mod:`._publisher` — ``Nats-Msg-Id`` dedupe, a batch in flight, every ack awaited;
- :mod:`._consumer` — consumer groups: a durable per group, deliveries, dead letters;
- :mod:`._tail` — ``stream()``: an ephemeral consumer without a group.
"""

try:
    import nats  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from outbox.exceptions import MissingDependency

    raise MissingDependency("NATSProvider", "nats", "nats-py") from exc

from outbox.providers.nats._connection import MSG_ID_HEADER
from outbox.providers.nats._consumer import NATSDelivery, NATSGroupReader
from outbox.providers.nats._provider import NATSProvider
from outbox.providers.nats._subjects import filter_subject

__all__ = ["MSG_ID_HEADER", "NATSDelivery", "NATSGroupReader", "NATSProvider", "filter_subject"]

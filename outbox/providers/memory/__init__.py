"""The in-process provider: the embedded default and the provider for tests.

- :mod:`._provider` — :class:`MemoryProvider`: the bounded store, publishing, streams;
- :mod:`._groups` — its consumer groups (:meth:`MemoryProvider.consume`);
- :mod:`._stream` — the iterator :meth:`MemoryProvider.stream` returns;
- :mod:`._copy` — :func:`copy_event`, the fast deep copy of an event.
"""

from outbox.providers.memory._copy import copy_event
from outbox.providers.memory._groups import MemoryDelivery, MemoryGroupMember
from outbox.providers.memory._provider import MemoryProvider
from outbox.providers.memory._stream import MemoryStream

__all__ = ["MemoryDelivery", "MemoryGroupMember", "MemoryProvider", "MemoryStream",
           "copy_event"]

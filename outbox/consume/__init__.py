"""Consumers in other processes: :class:`Consumer` and ``python -m outbox.consume`` (SPEC §6b)."""

from outbox.consume.consumer import Consumer, ConsumerStats

__all__ = ["Consumer", "ConsumerStats"]

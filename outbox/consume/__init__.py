"""Consumers in other processes: :class:`Consumer` and ``python -m outbox.consume``."""

from outbox.consume.consumer import Consumer, ConsumerStats

__all__ = ["Consumer", "ConsumerStats"]

"""Pieces shared by the message-bus providers (Redis Streams, NATS JetStream).

Kept out of ``redis.py``/``nats.py`` so both behave the same: group-name rules, the one-pattern-
per-group rule inside a process, reconnect backoff, outage logging and URL redaction.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from outbox.exceptions import ProviderError
from outbox.patterns import compile_pattern

__all__ = [
    "Backoff",
    "GroupRegistry",
    "OutageLog",
    "SettleOnce",
    "redact_url",
    "validate_group",
]

_GROUP = re.compile(r"[A-Za-z0-9_-]{1,200}")


def validate_group(group: str) -> str:
    """A consumer group name: 1-200 of ``[A-Za-z0-9_-]`` (valid as a JetStream durable name too)."""
    if not isinstance(group, str) or not _GROUP.fullmatch(group):
        raise ValueError(
            f"invalid consumer group {group!r}: use 1-200 letters, digits, '_' or '-' "
            "(it is the Redis consumer-group name and the JetStream durable name)"
        )
    return group


def redact_url(url: str) -> str:
    """``url`` with any password / token replaced by ``***`` (for logs and reprs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    # nats://TOKEN@host: a lone user part is a token, hidden as well.
    userinfo = (f"{user}:***" if user else ":***") if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query,
                       parts.fragment))


@dataclass
class Backoff:
    """Exponential reconnect backoff with jitter: ``initial`` doubling up to ``maximum``."""

    initial: float = 0.1
    maximum: float = 5.0
    _current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._current = self.initial if not self._current else min(self.maximum,
                                                                   self._current * 2)
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._current = 0.0


class OutageLog:
    """Logs the transitions available → unavailable → available once each, not every retry."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._down_since: float | None = None

    def down(self, error: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._logger.warning("%s unavailable, retrying with backoff: %s", self._what,
                                 _describe(error))

    def up(self) -> None:
        if self._down_since is not None:
            self._logger.warning("%s reachable again after %.1f s", self._what,
                                 time.monotonic() - self._down_since)
            self._down_since = None


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


class GroupRegistry:
    """Which pattern each consumer group is consumed with inside this process.

    A group is one queue: a consumer that filters by pattern must settle (ack) what it does not
    want, or those entries would be redelivered forever. Two iterators of one group with
    *different* patterns in one process would therefore ack away each other's events; that is
    refused. Consume the union once and dispatch by pattern (``outbox.Consumer`` does that).
    """

    def __init__(self) -> None:
        self._patterns: dict[str, tuple[str, int]] = {}

    def acquire(self, group: str, pattern: str) -> None:
        """Register one iterator of ``group`` (any key naming the group uniquely)."""
        compile_pattern(pattern)
        current = self._patterns.get(group)
        if current is not None and current[0] != pattern:
            name = group.rsplit("/", 1)[-1]
            raise ProviderError(
                f"consumer group {name!r} is already consumed with pattern {current[0]!r} in "
                f"this process; consuming it with {pattern!r} as well would acknowledge events "
                "the other pattern needs. Consume one covering pattern per group (outbox."
                "Consumer dispatches by pattern) or use another group."
            )
        self._patterns[group] = (pattern, (current[1] if current else 0) + 1)

    def release(self, group: str) -> None:
        current = self._patterns.get(group)
        if current is None:
            return
        if current[1] <= 1:
            del self._patterns[group]
        else:
            self._patterns[group] = (current[0], current[1] - 1)


class SettleOnce:
    """Delivery mixin: ack / nack / park exactly once.

    Subclasses call :meth:`_check` before settling and set ``_settled`` only after the broker
    accepted the settlement, so a call that failed (broker down) can be retried.
    """

    _settled: str | None = None

    def _check(self, how: str) -> None:
        if self._settled is not None:
            raise ProviderError(f"delivery of event {getattr(self, 'event', None)!r} already "
                                f"settled ({self._settled}); cannot {how} it")

    @property
    def settled(self) -> bool:
        return self._settled is not None

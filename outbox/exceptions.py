"""Every error outbox raises derives from :class:`OutboxError`.

Catch ``OutboxError`` to handle anything the library raises on purpose; the subclasses say which
part of the data flow refused (configuration, capture, broker, provider, wire format).
"""

from __future__ import annotations

from outbox._meta import DISTRIBUTION

__all__ = [
    "BrokerClosed",
    "BrokerNotStarted",
    "CaptureError",
    "ClusterChanged",
    "ConfigError",
    "DatabaseUnavailable",
    "EventNotFound",
    "HandlerError",
    "MalformedMessage",
    "MigrationError",
    "MissingDependency",
    "NoInboxTransaction",
    "OutboxError",
    "ProviderError",
    "ProviderFull",
    "ProviderUnavailable",
    "QueueFull",
    "SchemaMissing",
    "SerializationError",
    "UnsupportedOperation",
]


class OutboxError(Exception):
    """Root of every exception raised by outbox."""


class ConfigError(OutboxError, ValueError):
    """Invalid configuration. The message names the offending key, never a secret value.

    A configuration with several problems raises one ``ConfigError`` whose :attr:`problems` are
    all of them (its message: one line each); a single problem's ``problems`` is itself.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.problems: tuple[ConfigError, ...] = (self,)
        super().__init__(f"{key}: {message}" if key else message)

    @classmethod
    def of(cls, problems: list[ConfigError]) -> ConfigError:
        """One error for ``problems`` (two or more: their messages, one per line)."""
        if len(problems) == 1:
            return problems[0]
        error = cls("", "\n".join(str(p) for p in problems))
        error.problems = tuple(problems)
        return error


class MissingDependency(OutboxError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.feature = feature
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{module}' package: pip install '{DISTRIBUTION}[{extra}]'"
        )


class CaptureError(OutboxError):
    """Change capture was configured or used in a way that would silently lose events."""


class SerializationError(CaptureError, TypeError):
    """A value could not be turned into JSON. Raised at flush; nothing is committed."""

    def __init__(self, model: str, column: str, value: object) -> None:
        self.model = model
        self.column = column
        self.value_type = type(value)
        super().__init__(
            f"cannot serialise {model}.{column}: value of type "
            f"{type(value).__module__}.{type(value).__qualname__} is not JSON-serialisable "
            "(exclude the column with capture(exclude=...) or store a JSON-friendly type)"
        )


class UnsupportedOperation(CaptureError):
    """A statement would bypass capture (e.g. ORM bulk DML without RETURNING support)."""


class SchemaMissing(OutboxError):
    """The outbox tables do not exist in the target database."""


class MigrationError(OutboxError):
    """An outbox migration cannot run as asked (the message says what to do)."""


class DatabaseUnavailable(OutboxError):
    """The relay's database cannot be reached (raised at start; the loop retries later)."""


class BrokerNotStarted(OutboxError, RuntimeError):
    """``publish`` was called before ``Broker.start()``."""


class BrokerClosed(OutboxError, RuntimeError):
    """``publish`` was called after ``Broker.stop()`` began."""


class QueueFull(OutboxError):
    """The async broker's bounded queue is full; the event was not accepted."""


class HandlerError(OutboxError):
    """One or more handlers failed for an event (raised by ``publish_sync``).

    ``errors`` maps the handler name to the exception it raised on its last attempt.
    """

    def __init__(self, event_id: object, errors: dict[str, BaseException]) -> None:
        self.event_id = event_id
        self.errors = errors
        joined = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in errors.items())
        super().__init__(f"event {event_id}: {joined}")


class ProviderError(OutboxError):
    """A provider refused an operation for a reason specific to the request."""


class ClusterChanged(ProviderError):
    """A consumer group's positions come from another PostgreSQL cluster (dump/restore)."""


class EventNotFound(ProviderError, KeyError):
    """No event with that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "event not found"


class ProviderFull(ProviderError):
    """The provider cannot accept more events without dropping pending ones."""


class ProviderUnavailable(ProviderError):
    """The provider (Redis, NATS, database) cannot be reached. Retry later; not an event failure."""


class MalformedMessage(ProviderError):
    """A message on a stream is not a valid outbox CloudEvents document."""


class NoInboxTransaction(OutboxError, LookupError):
    """``outbox.inbox.current_session()`` was called outside a handler run by a consumer with an
    inbox."""

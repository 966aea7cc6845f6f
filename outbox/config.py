"""Configuration: YAML under ``event_broker:``, ``${VAR}`` expansion, ``OUTBOX_*`` overrides.

Precedence, lowest first: defaults → the YAML file (``path``, else ``$OUTBOX_CONFIG``) →
``OUTBOX_*`` environment variables → :meth:`Config.with_overrides` (command-line flags).

Every key has an environment variable named ``OUTBOX_`` + its path in capitals with ``_`` for
``.``: ``OUTBOX_PROVIDER``, ``OUTBOX_DATABASE_URL``, ``OUTBOX_REDIS_URL``,
``OUTBOX_NATS_URL``, ``OUTBOX_INSTANCE_ID``, ``OUTBOX_REDIS_STREAM_NAME``,
``OUTBOX_RETRY_POLICY_MAX_RETRIES``, ``OUTBOX_METRICS_PORT`` …

Each section is a frozen dataclass; its fields *are* the schema: adding a key is adding one field
(type annotation + default; ``secret``/``url`` flags in the field metadata). Values are checked
against the annotation (seconds: a number, or a duration in the command line's grammar, ``30s``,
``1h30m``, ``2w``: :mod:`outbox._duration`); errors raise :class:`ConfigError` naming the key
(``event_broker.redis.port``) and never show secret values or URLs (which may embed
credentials). ``repr()`` and :meth:`Config.to_dict` show secrets as ``***`` and URLs with their
credentials hidden (:mod:`outbox._redact`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union
from urllib.parse import urlsplit

from outbox._duration import parse_duration
from outbox._redact import redact as redact_url
from outbox._retry import RetryPolicy
from outbox.exceptions import ConfigError, MissingDependency
from outbox.providers import _registry

if TYPE_CHECKING:
    from outbox.providers.base import Provider

__all__ = [
    "Config",
    "ConsoleConfig",
    "DatabaseConfig",
    "MemoryConfig",
    "MetricsConfig",
    "NATSConfig",
    "RedisConfig",
    "provider_from_config",
    "redact_url",
    "unknown_variables",
]

log = logging.getLogger("outbox.config")

ROOT = "event_broker"
ENV_PREFIX = "OUTBOX_"
#: The ``provider`` key's choices: the table of ``outbox.providers._registry``.
PROVIDERS: tuple[str, ...] = tuple(_registry.PROVIDERS)


def _secret(default: Any = None) -> Any:
    return field(default=default, metadata={"secret": True})


def _url(*schemes: str, default: Any = None) -> Any:
    return field(default=default, metadata={"url": schemes})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: Any, minimum: float, *, above: bool = False) -> Any:
    return field(default=default, metadata={"min": minimum, "above": above})


class _Section:
    """Shared repr that hides secrets and passwords inside URLs."""

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value is not None:
                text = "'***'"
            elif f.metadata.get("url") and isinstance(value, str):
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class DatabaseConfig(_Section):
    """``event_broker.database``: the events table the relay reads (and the database provider)."""

    url: str | None = _url("*")
    poll_interval: float = _at_least(1.0, 0, above=True)
    batch_size: int = _at_least(100, 1)
    lease: float = _at_least(30.0, 0, above=True)
    notify: bool = True
    # PgBouncer in transaction pooling between outbox and PostgreSQL (outbox/_engines.py): no
    # prepared statements, no session state, no LISTEN through it (poll, or listen_url).
    pgbouncer: bool = False
    #: a direct connection (not through the pooler) for LISTEN in PgBouncer mode
    listen_url: str | None = _url("*")
    # Database provider consumers (outbox/providers/database): takes of an event from members
    # that died without settling it, before it is parked in outbox_dead_letters.
    max_deliveries: int = _at_least(10, 1)


@dataclass(frozen=True, repr=False)
class RedisConfig(_Section):
    """``event_broker.redis``: Redis Streams. ``url`` wins over host/port/db/password."""

    url: str | None = _url("redis", "rediss", "unix")
    host: str = "127.0.0.1"
    port: int = field(default=6379, metadata={"min": 1, "max": 65535})
    db: int = _at_least(0, 0)
    username: str | None = None
    password: str | None = _secret()
    stream_name: str = "outbox:events"
    consumer_group: str = "outbox-workers"
    max_len: int = _at_least(10000, 1)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    socket_timeout: float = _at_least(5.0, 0, above=True)
    connect_timeout: float = _at_least(5.0, 0, above=True)
    # Consumer groups and dedupe (outbox/providers/redis/): reclaim entries idle this long,
    # dead-letter after this many deliveries, keep publish dedupe keys this long (seconds).
    claim_idle: float = _at_least(30.0, 0, above=True)
    max_deliveries: int = _at_least(10, 1)
    duplicate_window: float = _at_least(120.0, 0, above=True)
    # Streams the events are spread over by ordering key; > 1: each read by one member of a
    # group at a time, so a key's events keep their order across the group (_shards.py).
    shards: int = field(default=1, metadata={"min": 1, "max": 1024})

    def connection_url(self) -> str:
        """``url``, or one built from host/port/db/tls (credentials are passed separately)."""
        if self.url:
            return self.url
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True, repr=False)
class NATSConfig(_Section):
    """``event_broker.nats``: NATS JetStream. ``url`` may list several servers, comma-separated."""

    url: str = _url("nats", "tls", "ws", "wss", default="nats://127.0.0.1:4222")
    stream_name: str = "OUTBOX_EVENTS"
    subject_prefix: str = "events"
    max_age: float = _at_least(86400.0, 0, above=True)
    durable: str | None = None
    token: str | None = _secret()
    user: str | None = None
    password: str | None = _secret()
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = _at_least(5.0, 0, above=True)
    # JetStream (outbox/providers/nats/): Nats-Msg-Id dedupe window, ack_wait of the durables,
    # deliveries before the dead-letter stream, publish ack timeout, reconnect interval (seconds).
    duplicate_window: float = _at_least(120.0, 0, above=True)
    claim_idle: float = _at_least(30.0, 0, above=True)
    max_deliveries: int = _at_least(10, 1)
    request_timeout: float = _at_least(10.0, 0, above=True)
    reconnect_wait: float = _at_least(1.0, 0, above=True)
    # Subject partitions by ordering key, each handing out one message at a time across a group
    # (per-key order across its members); copies of the streams on a JetStream cluster.
    partitions: int = field(default=1, metadata={"min": 1, "max": 1024})
    replicas: int = field(default=1, metadata={"min": 1, "max": 5})


@dataclass(frozen=True, repr=False)
class MemoryConfig(_Section):
    """``event_broker.memory``: the in-process provider."""

    max_events: int = _at_least(10000, 1)
    cleanup_interval: float = _at_least(300.0, 0)
    max_age: float = _at_least(86400.0, 0, above=True)


@dataclass(frozen=True, repr=False)
class MetricsConfig(_Section):
    """``event_broker.metrics``: the /metrics, /healthz, /readyz listener of the relay and of
    ``python -m outbox.consume`` (off: no port)."""

    port: int | None = field(default=None, metadata={"min": 0, "max": 65535})
    host: str = "127.0.0.1"


@dataclass(frozen=True, repr=False)
class ConsoleConfig(_Section):
    """``event_broker.console``: ``python -m outbox console`` (docs/console.md). Sign-in with
    ``token`` and/or ``username`` + ``password``; ``secret`` signs sessions and CSRF tokens
    (default: random per process); ``redact``: JSON paths never shown (``payload.password``)."""

    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata={"min": 0, "max": 65535})
    token: str | None = _secret()
    username: str | None = None
    password: str | None = _secret()
    secret: str | None = _secret()
    read_only: bool = False
    redact: tuple[str, ...] = ()
    page_size: int = field(default=50, metadata={"min": 1, "max": 500})
    #: Seconds after which a page's query is cancelled (PostgreSQL).
    query_timeout: float = _at_least(10.0, 0, above=True)


_RETRY_FIELDS: dict[str, Any] = {
    "max_retries": int,
    "initial_delay": float,
    "max_delay": float,
    "backoff_factor": float,
    "jitter": float,
}


@dataclass(frozen=True, repr=False)
class Config(_Section):
    """The whole ``event_broker:`` section. Build with :meth:`load` (or the constructor).

    ``instance_id`` ``None`` means hostname-pid (:func:`get_instance_id`). ``enabled`` is
    accepted for configuration files that set it; outbox itself does not consult it.
    """

    provider: str = _choice("memory", *PROVIDERS)
    mode: str = _choice("async", "sync", "async")
    worker_count: int = _at_least(10, 1)
    buffer_size: int = _at_least(1000, 1)
    instance_id: str | None = None
    enabled: bool = True
    #: Modules the relay/consumer import so their ``@outbox.subscribe`` handlers register
    #: (``OUTBOX_APPS``: comma-separated).
    apps: tuple[str, ...] = ()
    log_level: str = _choice("INFO", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    nats: NATSConfig = field(default_factory=NATSConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "database", "redis", "nats", "memory", "metrics", "console", "retry_policy",
    )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
        *, warn_unknown: bool = True,
    ) -> Config:
        """Defaults, then the YAML file, then ``OUTBOX_*`` variables from ``env``.

        ``path`` defaults to ``$OUTBOX_CONFIG``; without either, no file is read. ``env``
        defaults to ``os.environ`` (used for ``${VAR}`` expansion too). An ``OUTBOX_*`` variable
        that names no key (a typo: ``OUTBOX_DATABSE_URL``) is logged as a warning on the
        ``outbox.config`` logger (``warn_unknown=False``: not; :func:`unknown_variables`
        lists them).
        """
        env = os.environ if env is None else env
        if warn_unknown:
            for message in unknown_variables(env):
                log.warning("%s", message)
        if path is None:
            path = env.get(f"{ENV_PREFIX}CONFIG") or None
        data: Mapping[str, Any] = {}
        if path is not None:
            data = _read_yaml(Path(path))
        return cls.from_dict(data, env=env)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
        """Build from the mapping under ``event_broker:`` (or a mapping with that one root key).

        ``${VAR}`` references are expanded from ``env`` and ``OUTBOX_*`` variables in ``env``
        override keys; ``env`` defaults to an empty mapping here (``load`` passes
        ``os.environ``).
        """
        env = {} if env is None else env
        if not isinstance(data, Mapping):
            raise ConfigError(ROOT, "must be a mapping of keys to values")
        if set(data) == {ROOT}:
            data = data[ROOT] or {}
            if not isinstance(data, Mapping):
                raise ConfigError(ROOT, "must be a mapping of keys to values")
        raw = _expand(data, env, ROOT)
        _apply_env(raw, env)
        return _build_all(raw)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys replaced (``{"database.batch_size": 500}``), validated.

        Strings are converted like environment values; ``None`` values are ignored (handy for
        unset command-line flags).
        """
        raw = _to_raw(self)
        for dotted, value in overrides.items():
            if value is None:
                continue
            _set_dotted(raw, dotted, _FromText(value) if isinstance(value, str) else value)
        return _build_all(raw)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain data (secrets as ``***`` unless ``redact=False``)."""
        return _to_raw(self, redact=redact)


# -- provider factory ----------------------------------------------------------------------------

def provider_from_config(config: Config) -> Provider:
    """The provider ``config.provider`` names, configured from its section.

    ``memory`` → :class:`~outbox.MemoryProvider`; ``redis``/``nats``/``database`` →
    ``RedisProvider.from_config(config)`` etc., imported only now (the table of providers is
    ``outbox.providers._registry``). A missing driver raises :class:`MissingDependency` naming
    the extra to install.
    """
    import importlib

    from outbox.providers._registry import entry

    spec = entry(config.provider)
    if spec is None:
        raise ConfigError(f"{ROOT}.provider", f"unknown provider {config.provider!r}; "
                          f"expected one of {', '.join(PROVIDERS)}")
    module_name, _, class_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in spec.drivers:
            raise MissingDependency(f"the {spec.name} provider", spec.drivers[missing],
                                    missing) from exc
        if exc.name == module_name and spec.extra and spec.package:
            raise MissingDependency(f"the {spec.name} provider", spec.extra,
                                    spec.package) from exc
        raise
    try:
        provider: Provider = getattr(module, class_name).from_config(config)
    except ConfigError:
        raise
    except ValueError as exc:  # the provider's own validation ("redis.max_len must be …")
        raise ConfigError("", f"{ROOT}.{exc}") from None
    return provider


# -- loading internals -----------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _FromText(str):
    """A string from the environment or ``${VAR}`` expansion: converted to the field's type."""

    __slots__ = ()


def _read_yaml(path: Path) -> Mapping[str, Any]:
    import yaml  # here, not at the top: most starts read no file, and the import takes 15 ms

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"configuration file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read configuration file {str(path)!r}: "
                          f"{exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("", f"{str(path)!r} is not valid YAML{line}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError("", f"{str(path)!r} must contain a mapping with an "
                          f"'{ROOT}:' key")
    if ROOT not in doc:
        raise ConfigError(ROOT, f"missing in {str(path)!r} (outbox reads its settings from "
                          f"the '{ROOT}:' key)")
    section = doc[ROOT]
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(ROOT, "must be a mapping of keys to values")
    return section


def _expand(value: Any, env: Mapping[str, str], key: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"keys must be strings, got {type(k).__name__}")
            out[k] = _expand(v, env, f"{key}.{k}")
        return out
    if isinstance(value, list):
        return [_expand(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "$" in value:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            found = env.get(name)
            if found:
                return found
            if default is not None:
                return default
            raise ConfigError(key, f"environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")

        return _FromText(_VAR.sub(replace, value))
    return value


def _variables() -> dict[str, str]:
    """``OUTBOX_*`` variable name -> dotted key, for every key of :class:`Config`."""
    return {ENV_PREFIX + "_".join(path).upper(): ".".join(path) for path, _ in _all_keys(Config)}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, dotted in _variables().items():
        if name in env:
            _set_dotted(raw, dotted, _FromText(env[name]))


#: ``OUTBOX_*`` variables that are not keys but are read elsewhere (the file's path; this
#: repository's test suite and CI).
_NOT_KEYS = frozenset({f"{ENV_PREFIX}CONFIG"})
_NOT_KEY_PREFIXES = (f"{ENV_PREFIX}TEST_", f"{ENV_PREFIX}CI_")


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each ``OUTBOX_*`` variable in ``env`` that no key reads (with the name
    it was probably meant to be): such a variable is ignored, so a typo would go unnoticed."""
    import difflib

    known = _variables()
    out = []
    for name in sorted(env):
        if (not name.startswith(ENV_PREFIX) or name in known or name in _NOT_KEYS
                or name.startswith(_NOT_KEY_PREFIXES)):
            continue
        close = difflib.get_close_matches(name, [*known, *_NOT_KEYS], n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"environment variable {name} is not an outbox setting and is "
                   f"ignored{hint}")
    return out


def _all_keys(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field[Any]]]:
    out: list[tuple[tuple[str, ...], dataclasses.Field[Any]]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            out.extend(((f.name, *p), g) for p, g in _all_keys(sub))
        else:
            out.append(((f.name,), f))
    return out


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{ROOT}.{dotted}", f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build_all(raw: Mapping[str, Any]) -> Config:
    """The :class:`Config` of ``raw``, or one :class:`ConfigError` naming every problem in it."""
    problems: list[ConfigError] = []
    config = _build(Config, raw, ROOT, problems)
    if problems:
        raise ConfigError.of(problems)
    assert isinstance(config, Config)
    return config


def _build(cls: type[Any], raw: Mapping[str, Any], key: str, problems: list[ConfigError]) -> Any:
    """``cls`` from ``raw``; each problem is added to ``problems`` (the value is then unusable)
    and the rest is still checked, so that one run reports them all."""
    if not isinstance(raw, Mapping):
        problems.append(ConfigError(key, f"must be a mapping, got {_kind(raw)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(problems)
    problems.extend(ConfigError(f"{key}.{name}", "unknown key; known keys here: "
                                + ", ".join(fields)) for name in sorted(set(raw) - set(fields)))
    values: dict[str, Any] = {}
    for name, value in raw.items():
        f = fields.get(name)
        if f is None:
            continue
        sub_key = f"{key}.{name}"
        target = hints[name]
        if (target is not RetryPolicy and dataclasses.is_dataclass(target)
                and isinstance(target, type)):
            values[name] = _build(target, {} if value is None else value, sub_key, problems)
            continue
        try:
            if target is RetryPolicy:
                values[name] = _retry_policy({} if value is None else value, sub_key)
            else:
                values[name] = _convert(value, target, f, sub_key)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return None if len(problems) > before else cls(**values)


def _retry_policy(raw: Any, key: str) -> RetryPolicy:
    if isinstance(raw, RetryPolicy):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {_kind(raw)}")
    unknown = sorted(set(raw) - set(_RETRY_FIELDS))
    if unknown:
        raise ConfigError.of([ConfigError(f"{key}.{name}", "unknown key; known keys here: "
                                          + ", ".join(_RETRY_FIELDS)) for name in unknown])
    kwargs = {
        name: _convert(value, _RETRY_FIELDS[name], None, f"{key}.{name}")
        for name, value in raw.items()
    }
    try:
        return RetryPolicy(**kwargs)
    except ValueError as exc:
        name = str(exc).split(" ")[0].removeprefix("retry_policy.")
        raise ConfigError(f"{key}.{name}", str(exc).split(" ", 1)[1]) from None


def _convert(value: Any, target: Any, f: dataclasses.Field[Any] | None, key: str) -> Any:
    meta: Mapping[str, Any] = f.metadata if f is not None else {}
    secret = bool(meta.get("secret") or meta.get("url"))
    base, optional = _unwrap_optional(target)
    from_text = isinstance(value, _FromText)
    if value is None or (from_text and value == "" and optional):
        if optional:
            return None
        raise ConfigError(key, "must be set (null is not allowed here)")
    if from_text:
        value = _parse_text(str(value), base, key, secret)
    result = _check_type(value, base, key, secret)
    _check_constraints(result, meta, key)
    return result


def _unwrap_optional(target: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(target)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(target) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(target))
    return target, False


_SECONDS = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_text(text: str, base: Any, key: str, secret: bool) -> Any:
    shown = "" if secret else f", got {text!r}"
    if base is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(key, f"expected a boolean (true/false/1/0/yes/no/on/off){shown}")
    if base is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(key, f"expected an integer{shown}") from None
    if base is float:
        return _duration(text, key, shown)
    if typing.get_origin(base) is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    return str(text)


def _duration(text: str, key: str, shown: str) -> float:
    """Seconds: a plain number, or a duration in the grammar of :mod:`outbox._duration`."""
    if _SECONDS.match(text):
        return float(text)
    try:
        return parse_duration(text).total_seconds()
    except ValueError:
        raise ConfigError(key, "expected a number of seconds or a duration like 30s, 5m, "
                          f"24h, 1h30m{shown}") from None


def _check_type(value: Any, base: Any, key: str, secret: bool) -> Any:
    shown = "" if secret else f" ({value!r})"
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {_kind(value)}{shown}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {_kind(value)}{shown}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # durations such as "24h" are fine in YAML too
            return _duration(value, key, "" if secret else f", got {value!r}")
        raise ConfigError(key, f"expected a number, got {_kind(value)}{shown}")
    if base is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(key, f"expected a string, got {_kind(value)}{shown}")
    if typing.get_origin(base) is tuple:  # tuple[str, ...]: a list of strings
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(str(v) for v in value)
        raise ConfigError(key, f"expected a list of strings, got {_kind(value)}{shown}")
    raise AssertionError(f"unsupported config type {base!r} for {key}")


def _check_constraints(value: Any, meta: Mapping[str, Any], key: str) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    minimum = meta.get("min")
    if minimum is not None and value is not None:
        if meta.get("above") and not value > minimum:
            raise ConfigError(key, f"must be greater than {minimum}, got {value!r}")
        if value < minimum:
            raise ConfigError(key, f"must be at least {minimum}, got {value!r}")
    maximum = meta.get("max")
    if maximum is not None and value is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum}, got {value!r}")
    schemes = meta.get("url")
    if schemes and value is not None:
        _check_url(value, schemes, key)


def _check_url(value: str, schemes: tuple[str, ...], key: str) -> None:
    if not value.strip():
        raise ConfigError(key, "must not be empty")
    if schemes == ("*",):  # an SQLAlchemy URL
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except (ArgumentError, ValueError):
            raise ConfigError(key, "is not a valid database URL (expected e.g. "
                              "postgresql+psycopg://user@host/dbname or sqlite:///outbox.db)"
                              ) from None
        return
    for part in value.split(","):
        try:
            parts = urlsplit(part.strip())
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ConfigError(key, "is not a valid URL (bad port or syntax)") from None
        if parts.scheme not in schemes:
            raise ConfigError(key, f"URL scheme must be one of {', '.join(schemes)}")
        if parts.scheme != "unix" and not parts.hostname:
            raise ConfigError(key, "URL has no host")


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _to_raw(obj: Any, *, redact: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _to_raw(value, redact=redact)
        elif redact and f.metadata.get("secret") and value is not None:
            out[f.name] = "***"
        elif redact and f.metadata.get("url") and isinstance(value, str):
            out[f.name] = redact_url(value)
        else:
            out[f.name] = value
    return out

"""Configuration loading: file, ``${VAR}`` expansion, ``OUTBOX_*`` overrides, validation."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import pytest

from outbox import Config, MemoryProvider, RetryPolicy
from outbox.config import provider_from_config, redact_url, unknown_variables
from outbox.exceptions import ConfigError, MissingDependency

SEED_YAML = """
event_broker:
  enabled: true
  provider: redis # memory, redis, nats, database
  mode: async # sync, async
  worker_count: 10
  buffer_size: 1000
  instance_id: "${HOSTNAME}"

  redis:
    stream_name: "resolvespec:events"
    consumer_group: "resolvespec-workers"
    host: "localhost"
    port: 6379
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "outbox.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_spec() -> None:
    c = Config.load(env={})
    assert (c.provider, c.mode, c.worker_count, c.buffer_size) == ("memory", "async", 10, 1000)
    assert c.instance_id is None  # hostname-pid, computed by outbox.events.get_instance_id()
    assert c.retry_policy == RetryPolicy()
    assert (c.redis.max_len, c.redis.stream_name, c.redis.consumer_group) == (
        10000, "outbox:events", "outbox-workers")
    assert (c.nats.max_age, c.nats.stream_name, c.nats.subject_prefix) == (
        86400.0, "OUTBOX_EVENTS", "events")
    assert (c.database.poll_interval, c.database.batch_size, c.database.lease,
            c.database.notify) == (1.0, 100, 30.0, True)
    assert (c.metrics.port, c.metrics.host) == (None, "127.0.0.1")


def test_the_seed_example_loads(tmp_path: Path) -> None:
    c = Config.load(write(tmp_path, SEED_YAML), env={"HOSTNAME": "web-1"})
    assert c.provider == "redis" and c.instance_id == "web-1"
    assert (c.redis.host, c.redis.port, c.redis.stream_name) == (
        "localhost", 6379, "resolvespec:events")


def test_path_from_outbox_config(tmp_path: Path) -> None:
    path = write(tmp_path, "event_broker:\n  worker_count: 3\n")
    assert Config.load(env={"OUTBOX_CONFIG": str(path)}).worker_count == 3


def test_expansion_with_defaults_and_escapes(tmp_path: Path) -> None:
    path = write(tmp_path, """
event_broker:
  instance_id: "${POD:-local}-$${literal}"
  database:
    url: "postgresql+psycopg://app@${DB_HOST:-localhost}/app"
    batch_size: ${BATCH:-250}
    notify: ${NOTIFY:-off}
  nats:
    max_age: 2h
""")
    c = Config.load(path, env={"DB_HOST": "db.internal"})
    assert c.instance_id == "local-${literal}"
    assert c.database.url == "postgresql+psycopg://app@db.internal/app"
    assert c.database.batch_size == 250 and c.database.notify is False
    assert c.nats.max_age == 7200.0


def test_unset_variable_without_default_names_key_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"event_broker\.instance_id: .*HOSTNAME"):
        Config.load(write(tmp_path, SEED_YAML), env={})


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    env = {
        "HOSTNAME": "h",
        "OUTBOX_PROVIDER": "nats",
        "OUTBOX_DATABASE_URL": "sqlite:///x.db",
        "OUTBOX_REDIS_URL": "redis://127.0.0.1:6380/1",
        "OUTBOX_NATS_URL": "nats://127.0.0.1:4223",
        "OUTBOX_INSTANCE_ID": "from-env",
        "OUTBOX_WORKER_COUNT": "4",
        "OUTBOX_REDIS_STREAM_NAME": "s",
        "OUTBOX_RETRY_POLICY_MAX_RETRIES": "7",
        "OUTBOX_RETRY_POLICY_INITIAL_DELAY": "250ms",
        "OUTBOX_METRICS_PORT": "9100",
        "OUTBOX_DATABASE_NOTIFY": "false",
        "OUTBOX_APPS": "app.handlers, app.audit",
    }
    c = Config.load(write(tmp_path, SEED_YAML), env=env)
    assert (c.provider, c.instance_id, c.worker_count) == ("nats", "from-env", 4)
    assert c.database.url == "sqlite:///x.db" and c.database.notify is False
    assert c.redis.url == "redis://127.0.0.1:6380/1" and c.redis.stream_name == "s"
    assert c.redis.host == "localhost"  # from the file
    assert c.nats.url == "nats://127.0.0.1:4223"
    assert c.retry_policy.max_retries == 7 and c.retry_policy.initial_delay == 0.25
    assert c.metrics.port == 9100
    assert c.apps == ("app.handlers", "app.audit")


def test_overrides_from_flags_are_validated() -> None:
    c = Config().with_overrides({"database.batch_size": "500", "provider": "redis",
                                 "metrics.port": 0, "database.lease": None})
    assert (c.database.batch_size, c.provider, c.metrics.port) == (500, "redis", 0)
    assert c.database.lease == 30.0
    with pytest.raises(ConfigError, match=r"event_broker\.database\.batch_size"):
        c.with_overrides({"database.batch_size": "many"})
    with pytest.raises(ConfigError, match=r"event_broker\.database\.nope"):
        c.with_overrides({"database.nope": 1})


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        ({"provider": "kafka"}, "event_broker.provider", "must be one of"),
        ({"mode": "later"}, "event_broker.mode", "must be one of"),
        ({"worker_count": 0}, "event_broker.worker_count", "at least 1"),
        ({"worker_count": "ten"}, "event_broker.worker_count", "expected an integer"),
        ({"worker_count": True}, "event_broker.worker_count", "expected an integer"),
        ({"buffer_size": 1.5}, "event_broker.buffer_size", "expected an integer"),
        ({"workers": 3}, "event_broker.workers", "unknown key"),
        ({"redis": {"prot": 1}}, "event_broker.redis.prot", "unknown key"),
        ({"redis": []}, "event_broker.redis", "must be a mapping"),
        ({"redis": {"port": 70000}}, "event_broker.redis.port", "at most 65535"),
        ({"redis": {"url": "http://h:6379"}}, "event_broker.redis.url", "scheme"),
        ({"redis": {"url": "redis://h:port"}}, "event_broker.redis.url", "not a valid URL"),
        ({"nats": {"url": "nats://"}}, "event_broker.nats.url", "no host"),
        ({"database": {"url": "not a url"}}, "event_broker.database.url", "database URL"),
        ({"database": {"poll_interval": 0}}, "event_broker.database.poll_interval",
         "greater than 0"),
        ({"database": {"notify": "maybe"}}, "event_broker.database.notify",
         "expected true or false"),
        ({"nats": {"max_age": "forever"}}, "event_broker.nats.max_age", "duration"),
        ({"retry_policy": {"max_retries": -1}}, "event_broker.retry_policy.max_retries",
         ">= 0"),
        ({"retry_policy": {"tries": 3}}, "event_broker.retry_policy.tries", "unknown key"),
        ({"apps": "one"}, "event_broker.apps", "list of strings"),
        ({"log_level": "LOUD"}, "event_broker.log_level", "must be one of"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_dict(data)
    assert info.value.key == key or str(info.value).startswith(key)


def test_every_problem_is_reported_at_once() -> None:
    """One run names every bad key (not only the first), in files, sections and variables."""
    with pytest.raises(ConfigError) as info:
        Config.load(env={"OUTBOX_REDIS_PORT": "abc", "OUTBOX_WORKER_COUNT": "0"})
    assert {p.key for p in info.value.problems} == {"event_broker.redis.port",
                                                    "event_broker.worker_count"}
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"workers": 3, "provider": "kafka", "redis": {"prot": 1, "port": 0},
                          "retry_policy": {"tries": 3, "delay": 1}, "database": []})
    keys = [p.key for p in info.value.problems]
    assert sorted(keys) == sorted([
        "event_broker.workers", "event_broker.provider", "event_broker.redis.prot",
        "event_broker.redis.port", "event_broker.retry_policy.delay",
        "event_broker.retry_policy.tries", "event_broker.database"])
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]


def test_unknown_outbox_variables_are_named_with_a_guess(caplog: pytest.LogCaptureFixture) -> None:
    """A typo'd ``OUTBOX_*`` variable would be ignored: it is named, with what it resembles;
    the variables that are not keys (the file's path, the test suite's) are not."""
    env = {"OUTBOX_DATABSE_URL": "sqlite://", "OUTBOX_REDIS_URL": "redis://h/0",
           "OUTBOX_CONFIG_FILE": "x.yaml", "OUTBOX_TEST_PG_HOST": "db", "OUTBOX_CONFIG": "",
           "OUTBOX_FROBNICATE": "1", "OTHER": "x"}
    warnings = unknown_variables(env)
    assert warnings == [
        "environment variable OUTBOX_CONFIG_FILE is not an outbox setting and is ignored "
        "(did you mean OUTBOX_CONFIG?)",
        "environment variable OUTBOX_DATABSE_URL is not an outbox setting and is ignored "
        "(did you mean OUTBOX_DATABASE_URL?)",
        "environment variable OUTBOX_FROBNICATE is not an outbox setting and is ignored",
    ]
    with caplog.at_level(logging.WARNING, logger="outbox.config"):
        Config.load(env=env)
    assert [r.getMessage() for r in caplog.records] == warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="outbox.config"):
        Config.load(env=env, warn_unknown=False)
    assert not caplog.records


def test_bad_environment_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"event_broker\.redis\.port: expected an integer"):
        Config.load(env={"OUTBOX_REDIS_PORT": "abc"})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        Config.load(write(tmp_path, "event_broker:\n  provider: [\n"), env={})
    with pytest.raises(ConfigError, match="event_broker: missing"):
        Config.load(write(tmp_path, "provider: redis\n"), env={})
    assert Config.load(write(tmp_path, ""), env={}) == Config()
    assert Config.load(write(tmp_path, "event_broker:\n"), env={}) == Config()


SECRETS = ["hunter2-redis", "hunter2-url", "hunter2-nats-token", "hunter2-nats-pw"]


def secret_config() -> Config:
    return Config.from_dict({
        "redis": {"url": "redis://app:hunter2-url@127.0.0.1:6379/0", "password": "hunter2-redis"},
        "nats": {"token": "hunter2-nats-token", "user": "u", "password": "hunter2-nats-pw"},
        "database": {"url": "postgresql://app:hunter2-url@db/app"},
    })


def test_secrets_never_appear_in_repr_or_dict() -> None:
    c = secret_config()
    for text in (repr(c), str(c), repr(c.redis), str(c.to_dict())):
        for secret in SECRETS:
            assert secret not in text
    assert "***" in repr(c.redis) and "app:***@127.0.0.1:6379" in repr(c.redis)
    assert c.to_dict(redact=False)["redis"]["password"] == "hunter2-redis"


@pytest.mark.parametrize(
    "data",
    [
        {"redis": {"password": 12345}},
        {"redis": {"url": "http://app:hunter2-url@h/0"}},
        {"redis": {"url": "redis://app:hunter2-url@h:notaport/0"}},
        {"database": {"url": "hunter2-url"}},
        {"nats": {"token": ["hunter2-nats-token"]}},
    ],
)
def test_secrets_never_appear_in_errors(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    for secret in [*SECRETS, "12345"]:
        assert secret not in str(info.value)


def test_secret_from_environment_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={"OUTBOX_REDIS_URL": "redis://u:hunter2-url@h:bad/0"})
    assert "hunter2" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("nats://s3cr3t@h:4222") == "nats://***@h:4222"


def test_tokens_in_urls_never_appear_in_repr_or_dict() -> None:
    """A lone user-info part is a token (``nats://TOKEN@host``): hidden like a password."""
    c = Config.from_dict({
        "nats": {"url": "nats://s3cr3t@127.0.0.1:4222,nats://u:s3cr3t-pw@127.0.0.2:4222"},
        "redis": {"url": "rediss://s3cr3t@127.0.0.1:6380/0"},
    })
    for text in (repr(c), str(c), repr(c.nats), str(c.to_dict())):
        assert "s3cr3t" not in text
    assert "nats://***@127.0.0.1:4222,nats://u:***@127.0.0.2:4222" in repr(c.nats)
    assert c.to_dict()["redis"]["url"] == "rediss://***@127.0.0.1:6380/0"
    assert c.to_dict(redact=False)["nats"]["url"].startswith("nats://s3cr3t@")


def test_database_user_names_are_shown_and_query_secrets_hidden() -> None:
    """A SQL database URL's lone user-info part is a user name (shown); a password given as a
    query parameter is hidden in reprs and dicts like one in the user-info part."""
    c = Config.from_dict({"database": {
        "url": "postgresql+psycopg://app@db/shop?password=hunter2&sslmode=require",
        "listen_url": "postgresql+psycopg://app:hunter2@db-direct/shop"}})
    for text in (repr(c), repr(c.database), str(c.to_dict())):
        assert "hunter2" not in text
    assert c.to_dict()["database"]["url"] == \
        "postgresql+psycopg://app@db/shop?password=***&sslmode=require"
    assert c.to_dict()["database"]["listen_url"] == "postgresql+psycopg://app:***@db-direct/shop"


@pytest.mark.parametrize("text", ["30s", "500ms", "5m", "24h", "1d", "2w", "1h30m", "1.5h"])
def test_config_durations_are_the_command_lines(text: str) -> None:
    """One grammar: a config duration means what the same text means to ``python -m outbox``."""
    from outbox.cli import parse_duration

    seconds = parse_duration(text).total_seconds()
    assert Config.from_dict({"nats": {"max_age": text}}).nats.max_age == seconds
    assert Config.load(env={"OUTBOX_NATS_MAX_AGE": text}).nats.max_age == seconds


def test_config_durations_also_take_plain_seconds() -> None:
    assert Config.load(env={"OUTBOX_DATABASE_POLL_INTERVAL": "0.5"}).database.poll_interval == 0.5
    for bad in ("nan", "inf", "1e3", "1h 30m", "30 days"):
        with pytest.raises(ConfigError, match="duration like"):
            Config.load(env={"OUTBOX_DATABASE_POLL_INTERVAL": bad})


def test_provider_from_config_memory() -> None:
    c = Config.from_dict({"memory": {"max_events": 5, "max_age": "1h", "cleanup_interval": 0}})
    p = provider_from_config(c)
    assert isinstance(p, MemoryProvider)
    assert (p.max_events, p.max_age, p.cleanup_interval) == (5, 3600.0, 0.0)


def test_provider_from_config_imports_the_provider_lazily(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[Any] = []

    class FakeRedisProvider:
        @classmethod
        def from_config(cls, config: Config) -> FakeRedisProvider:
            made.append(config)
            return cls()

    class FakeModule:
        RedisProvider = FakeRedisProvider

    def fake_import(name: str) -> Any:
        assert name == "outbox.providers.redis"
        return FakeModule

    monkeypatch.setattr(importlib, "import_module", fake_import)
    c = Config(provider="redis")
    assert isinstance(provider_from_config(c), FakeRedisProvider) and made == [c]


@pytest.mark.parametrize(("provider", "driver", "extra"),
                         [("redis", "redis", "redis"), ("nats", "nats", "nats"),
                          ("database", "psycopg", "postgres")])
def test_missing_driver_is_a_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, provider: str, driver: str, extra: str
) -> None:
    def fake_import(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {driver!r}", name=driver)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(MissingDependency, match=rf"outbox\[{extra}\]"):
        provider_from_config(Config(provider=provider))


def test_provider_validation_errors_become_config_errors() -> None:
    pytest.importorskip("nats")
    c = Config.from_dict({"provider": "nats", "nats": {"stream_name": "a.b"}})
    with pytest.raises(ConfigError, match=r"event_broker\.nats\.stream_name"):
        provider_from_config(c)


def test_nats_provider_works_without_the_redis_driver() -> None:
    """The ``nats`` extra alone is enough: the NATS provider needs nothing of redis-py."""
    pytest.importorskip("nats")
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['redis'] = None\n"  # `import redis` now fails
        "from outbox import Config\n"
        "from outbox.config import provider_from_config\n"
        "from outbox import wire\n"
        "from outbox.events import new_event\n"
        "p = provider_from_config(Config.from_dict({'provider': 'nats', 'nats': "
        "{'stream_name': 'S1', 'durable': 'g1'}}))\n"
        "e = new_event('system', 'a.b', {'x': 1})\n"
        "assert wire.decode(wire.encode(e)).payload == {'x': 1}\n"
        "assert 'outbox.providers.redis' not in sys.modules\n"
        "print(type(p).__name__, p.stream_name, p.consumer_group)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NATSProvider", "S1", "g1"]


def test_pgbouncer_mode_from_env_and_flags() -> None:
    from outbox.relay.cli import build_parser, load_config

    env = {"OUTBOX_DATABASE_PGBOUNCER": "true",
           "OUTBOX_DATABASE_LISTEN_URL": "postgresql+psycopg://u:pw@db/app"}
    config = Config.load(env=env)
    assert config.database.pgbouncer is True
    assert config.database.listen_url == "postgresql+psycopg://u:pw@db/app"
    assert "pw" not in repr(config)  # a URL with a password is redacted like database.url
    args = build_parser().parse_args(["--pgbouncer", "--listen-url", "postgresql://direct/app"])
    flagged = load_config(args, {})
    assert (flagged.database.pgbouncer, flagged.database.listen_url) == (
        True, "postgresql://direct/app")
    assert load_config(build_parser().parse_args([]), {}).database.pgbouncer is False


def test_one_table_of_providers() -> None:
    """The ``provider`` choices, the consumer's choices and the factory read one table."""
    from outbox.config import PROVIDERS
    from outbox.consume.cli import PROVIDERS as CONSUMABLE
    from outbox.providers._registry import PROVIDERS as TABLE

    assert PROVIDERS == tuple(TABLE) == ("memory", "redis", "nats", "database")
    assert CONSUMABLE == ("redis", "nats", "database")  # memory stays in its process
    for entry in TABLE.values():
        module, _, name = entry.target.partition(":")
        assert hasattr(importlib.import_module(module), name), entry.target


@pytest.mark.parametrize(("settings", "expected"), [
    ({"provider": "redis"},
     "redis redis://127.0.0.1:6379/0 (the default address: no redis.url or host is configured)"),
    ({"provider": "redis", "redis": {"host": "cache.internal"}}, "redis redis://cache.internal:6379/0"),
    ({"provider": "redis", "redis": {"url": "redis://app:s3cret@cache:6380/2?password=x"}},
     "redis redis://app:***@cache:6380/2?password=***"),
    ({"provider": "nats"},
     "nats nats://127.0.0.1:4222 (the default address: no nats.url is configured)"),
    ({"provider": "nats", "nats": {"url": "nats://TOKEN@bus:4222"}}, "nats nats://***@bus:4222"),
    ({"provider": "database", "database": {"url": "postgresql://app:pw@db/shop?sslpassword=k"}},
     "database postgresql://app:***@db/shop?sslpassword=***"),
    ({"provider": "memory"}, "memory in this process only"),
])
def test_start_lines_say_where_events_go(settings: dict[str, Any], expected: str) -> None:
    from outbox.providers._registry import describe

    assert describe(Config.from_dict(settings)) == expected

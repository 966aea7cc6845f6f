"""The module-level default broker: outbox.subscribe / publish / initialize."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import outbox
from outbox import Config, Event, MemoryProvider, new_event
from outbox.broker import Broker, default


@pytest.fixture(autouse=True)
def isolated_default_broker() -> Iterator[None]:
    saved = default._snapshot()
    default.set_default_broker(None)
    default._registry.clear()
    yield
    default._restore(saved)
    outbox.events.set_instance_id(None)


def test_default_broker_is_created_lazily_once() -> None:
    first = outbox.get_default_broker()
    assert isinstance(first, Broker) and isinstance(first.provider, MemoryProvider)
    assert outbox.get_default_broker() is first
    assert not first.running  # the relay / consumer / app starts it


def test_subscribe_at_import_time_follows_the_default_broker() -> None:
    @outbox.subscribe("public.users.create")
    def on_user(event: Event) -> None:
        pass

    implicit = outbox.get_default_broker()
    [sub] = implicit.subscriptions()
    built = outbox.initialize(Config(worker_count=3, mode="sync"))
    assert outbox.get_default_broker() is built and built is not implicit
    assert built.worker_count == 3 and built.mode == "sync"
    [inherited] = built.subscriptions()
    assert (inherited.id, inherited.name, inherited.pattern.text) == (
        sub.id, sub.name, "public.users.create")
    assert inherited.name.endswith("on_user")


def test_set_default_broker_inherits_unless_told_not_to() -> None:
    outbox.subscribe("a.*", lambda e: None)
    b1, b2 = Broker(), Broker()
    assert outbox.set_default_broker(b1) is not None  # the lazily created one
    assert len(b1.subscriptions()) == 1
    assert outbox.set_default_broker(b2, inherit=False) is b1
    assert b2.subscriptions() == []
    with pytest.raises(TypeError):
        outbox.set_default_broker("broker")  # type: ignore[arg-type]


def test_module_unsubscribe_removes_everywhere() -> None:
    sub_id = outbox.subscribe("a.*", lambda e: None)
    default.unsubscribe(sub_id)
    assert outbox.get_default_broker().subscriptions() == []
    outbox.set_default_broker(Broker())
    assert outbox.get_default_broker().subscriptions() == []
    with pytest.raises(KeyError):
        default.unsubscribe("sub_unknown")


def test_initialize_sets_the_instance_id_from_config() -> None:
    broker = outbox.initialize(Config(instance_id="api-1"))
    assert broker.instance_id == "api-1"
    assert new_event("system", "x").instance_id == "api-1"


def test_initialize_loads_the_config_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_WORKER_COUNT", "4")
    monkeypatch.delenv("OUTBOX_CONFIG", raising=False)
    assert outbox.initialize().worker_count == 4


@pytest.mark.anyio
async def test_module_level_publish_helpers_use_the_default_broker() -> None:
    seen: list[str] = []
    broker = Broker(mode="sync")
    outbox.set_default_broker(broker)
    outbox.subscribe("t.*", lambda e: seen.append(e.type), threaded=False)
    async with broker:
        await outbox.publish(new_event("system", "t.publish"))
        await outbox.publish_sync(new_event("system", "t.sync"))
        await outbox.publish_async(new_event("system", "t.async"), timeout=1)
        await broker.join()
    assert seen == ["t.publish", "t.sync", "t.async"]

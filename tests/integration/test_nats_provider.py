"""NATSProvider on a real JetStream: what is NATS-specific (stream setup, subjects, Nats-Msg-Id
dedupe, the durable's filter, dead-letter subjects, outages, credentials, configuration).
Consumer groups: ``tests/conformance``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats
import pytest
from nats.js import api as js_api

from outbox import new_event, wire
from outbox.events import Event
from outbox.exceptions import MalformedMessage, ProviderError, ProviderUnavailable
from outbox.providers.base import Delivery
from outbox.providers.nats import NATSProvider, filter_subject
from tests import servers
from tests.conftest import NatsNames
from tests.helpers import eventually, nothing_more, take

pytestmark = pytest.mark.anyio


def _events(n: int, type_: str = "public.users.create") -> list[Event]:
    return [new_event(source="database", type=type_, payload={"i": i}) for i in range(n)]


def _provider(url: str, names: NatsNames, **kw: Any) -> NATSProvider:
    options: dict[str, Any] = {"claim_idle": 1.0, "block": 0.2}
    options.update(kw)
    return NATSProvider(url, stream_name=names.stream, subject_prefix=names.subject_prefix,
                        **options)


@pytest.fixture
async def provider(nats_url: str, nats_names: NatsNames) -> AsyncIterator[NATSProvider]:
    p = _provider(nats_url, nats_names)
    yield p
    await p.close()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def _ids(deliveries: list[Delivery]) -> list[uuid.UUID]:
    return [d.event.id for d in deliveries]


async def _publishes(p: NATSProvider, events: list[Event]) -> bool:
    """True once ``events`` were published, False while the server is unavailable."""
    try:
        assert await p.publish_many(events) == [None] * len(events)
    except ProviderUnavailable:
        return False
    return True


# -- stream and publishing ---------------------------------------------------------------------


def test_filter_subject_mapping() -> None:
    assert filter_subject("events", "*") == "events.>"
    assert filter_subject("events", "public.users.create") == "events.*.public.users.create"
    assert filter_subject("events", "public.*.create") == "events.*.public.*.create"
    assert filter_subject("events", "public.>") == "events.*.public.>"
    with pytest.raises(ValueError, match="invalid pattern"):
        filter_subject("events", "public..x")


async def test_stream_is_created_with_spec_settings(provider: NATSProvider, js: Any) -> None:
    await provider.publish(_events(1)[0])
    info = await js.stream_info(provider.stream_name)
    assert info.config.subjects == [f"{provider.subject_prefix}.>"]
    assert info.config.storage == js_api.StorageType.FILE
    assert info.config.max_age == pytest.approx(86400)
    assert info.config.duplicate_window == pytest.approx(120)


async def test_existing_stream_is_updated(nats_url: str, nats_names: NatsNames, js: Any) -> None:
    await js.add_stream(name=nats_names.stream, subjects=[f"{nats_names.subject_prefix}.old.>"],
                        storage=js_api.StorageType.FILE, max_age=60, duplicate_window=10)
    p = _provider(nats_url, nats_names, max_age=7200, duplicate_window=300)
    try:
        await p.publish(_events(1)[0])
    finally:
        await p.close()
    info = await js.stream_info(nats_names.stream)
    assert info.config.subjects == [f"{nats_names.subject_prefix}.>"]
    assert info.config.max_age == pytest.approx(7200)
    assert info.config.duplicate_window == pytest.approx(300)


async def test_publish_subject_header_and_dedupe(provider: NATSProvider, js: Any) -> None:
    events = _events(3)
    assert await provider.publish_many(events) == [None, None, None]
    await provider.publish(events[0])  # the relay retrying after a lost ack
    assert await provider.publish_many([events[1], events[1]]) == [None, None]
    info = await js.stream_info(provider.stream_name)
    assert info.state.messages == 3
    msg = await js.get_msg(provider.stream_name, 1)
    assert msg.subject == f"{provider.subject_prefix}.database.public.users.create"
    assert msg.headers["Nats-Msg-Id"] == str(events[0].id)
    assert wire.decode(msg.data).id == events[0].id
    stats = await provider.stats()
    assert stats.events_published == 3 and stats.extra["duplicates_dropped"] == 3


async def test_event_that_is_no_subject_fails_alone(provider: NATSProvider, js: Any) -> None:
    good = _events(2)
    bad_type = new_event(source="database", type="has space.x")
    no_id = Event(source="database", type="x")
    results = await provider.publish_many([good[0], bad_type, no_id, good[1]])
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], ProviderError) and "NATS subject" in str(results[1])
    assert isinstance(results[2], MalformedMessage)
    assert (await js.stream_info(provider.stream_name)).state.messages == 2


# -- durable groups ------------------------------------------------------------------------------


async def test_pattern_becomes_the_durables_filter(provider: NATSProvider, js: Any) -> None:
    users = _events(3, "public.users.create")
    orders = _events(3, "public.orders.create")
    async with provider.consume("public.users.*", group="users-only", start="beginning") as it:
        await provider.publish_many([x for pair in zip(users, orders, strict=True) for x in pair])
        got = await take(it, 3)
        await nothing_more(it)
    assert sorted(_ids(got)) == sorted(e.id for e in users)
    info = await js.consumer_info(provider.stream_name, "users-only")
    assert info.config.filter_subject == f"{provider.subject_prefix}.*.public.users.*"
    assert info.config.ack_policy == js_api.AckPolicy.EXPLICIT
    assert info.config.max_deliver == provider.max_deliveries + 1
    # The durable keeps its filter: another pattern for the same group is refused.
    other = provider.consume("public.orders.*", group="users-only")
    with pytest.raises(ProviderError, match="filters"):
        await other.__anext__()
    await other.aclose()


async def test_a_dead_letter_keeps_the_subject_and_the_document(provider: NATSProvider) -> None:
    events = _events(2)
    async with provider.consume(group="g", start="beginning") as it:
        await provider.publish_many(events)
        first, second = await take(it, 2, ack=False)
        await first.park("handler gave up: ValueError: nope")
        await second.ack()
    (dead,) = await provider.dead_letters()
    assert dead["subject"] == f"{provider.subject_prefix}_dead.g.database.public.users.create"
    assert dead["Nats-Msg-Id"] == f"g:{first.event.id}"  # deduped per group and event
    assert wire.decode(dead["event"]).id == first.event.id  # the document, unchanged


# -- connection settings and outages ----------------------------------------------------------


async def test_outage_raises_provider_unavailable_then_recovers() -> None:
    server = servers.PrivateNats()
    server.start()
    p = NATSProvider(server.url, connect_timeout=1, request_timeout=2, reconnect_wait=0.2)
    try:
        await p.publish_many(_events(2))
        server.stop()
        with anyio.fail_after(8):
            with pytest.raises(ProviderUnavailable):
                await p.publish_many(_events(2))
            with pytest.raises(ProviderUnavailable):
                await p.ping()
        server.start()
        await eventually(lambda: _publishes(p, _events(2)), within=15, every=0.2,
                         what="the client to reconnect on its own")
    finally:
        await p.close()
        server.close()


async def test_first_connection_fails_fast() -> None:
    p = NATSProvider(f"nats://127.0.0.1:{servers.free_port()}", connect_timeout=0.5,
                     reconnect_wait=0.1)
    with anyio.fail_after(10), pytest.raises(ProviderUnavailable):
        await p.publish(_events(1)[0])
    await p.close()


async def test_consumer_survives_a_restart() -> None:
    server = servers.PrivateNats()
    server.start()
    p = NATSProvider(server.url, block=0.2, reconnect_wait=0.2, request_timeout=2)
    try:
        async with p.consume(group="g", start="beginning") as it:
            earlier = _events(2)
            first = {e.id for e in earlier}
            await p.publish_many(earlier)
            await take(it, 2)
            server.stop()
            await anyio.sleep(0.5)
            server.start()
            later = _events(2)
            await eventually(lambda: _publishes(p, later), within=20, every=0.2,
                             what="the client to reconnect on its own")
            wanted = {e.id for e in later}
            seen: set[uuid.UUID] = set()
            with anyio.fail_after(20):
                while not wanted <= seen:
                    (d,) = await take(it, 1)
                    # At-least-once: an ack the killed server had not written to disk yet
                    # brings an earlier event back, with its own id.
                    seen.add(d.event.id)
        assert seen <= wanted | first
    finally:
        await p.close()
        server.close()


async def test_token_is_used_and_never_shown() -> None:
    secret = "tok-" + uuid.uuid4().hex[:10]
    server = servers.PrivateNats(args=("--auth", secret))
    server.start()
    try:
        good = NATSProvider(f"nats://{secret}@127.0.0.1:{server.port}")
        assert secret not in repr(good)
        await good.publish(_events(1)[0])
        await good.close()
        by_kw = NATSProvider(f"nats://127.0.0.1:{server.port}", token=secret)
        await by_kw.ping()
        await by_kw.close()
        wrong = NATSProvider(f"nats://127.0.0.1:{server.port}", token="nope",
                             connect_timeout=1, reconnect_wait=0.1)
        with pytest.raises(ProviderUnavailable) as info:
            await wrong.publish(_events(1)[0])
        assert secret not in str(info.value)
        await wrong.close()
    finally:
        server.close()


def test_from_config_reads_the_nats_section() -> None:
    p = NATSProvider.from_config({"nats": {
        "url": "nats://user:pw@127.0.0.1:4333", "stream_name": "S", "subject_prefix": "ev",
        "max_age": 3600, "durable": "grp", "duplicate_window": 30, "claim_idle": 9,
        "max_deliveries": 4,
    }})
    assert (p.stream_name, p.subject_prefix, p.max_age, p.consumer_group, p.duplicate_window,
            p.claim_idle, p.max_deliveries) == ("S", "ev", 3600.0, "grp", 30.0, 9.0, 4)
    assert "pw" not in repr(p)
    with pytest.raises(ValueError, match="duplicate_window"):
        NATSProvider(max_age=10, duplicate_window=20)
    with pytest.raises(ValueError, match="subject_prefix"):
        NATSProvider(subject_prefix="a b")

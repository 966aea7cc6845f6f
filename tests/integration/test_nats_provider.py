"""NATSProvider on a real JetStream: stream setup, Nats-Msg-Id dedupe, durables, dead letters."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from nats.js import api as js_api

from outbox import MalformedMessage, ProviderError, ProviderUnavailable, new_event, wire
from outbox.events import Event
from outbox.providers.base import Delivery, EventFilter, EventNotFound, SupportsConsume
from outbox.providers.nats import NATSProvider, filter_subject
from tests import servers
from tests.conftest import NatsNames

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


async def _take(it: AsyncIterator[Delivery], n: int, *, ack: bool = True,
                within: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(within):
        while len(got) < n:
            delivery = await it.__anext__()
            if ack:
                await delivery.ack()
            got.append(delivery)
    return got


async def _nothing_more(it: AsyncIterator[Delivery], wait: float = 0.8) -> None:
    with anyio.move_on_after(wait):
        extra = await it.__anext__()
        pytest.fail(f"unexpected delivery {extra!r}")


def _ids(deliveries: list[Delivery]) -> list[uuid.UUID]:
    return [d.event.id for d in deliveries]


# -- stream and publishing ---------------------------------------------------------------------


def test_filter_subject_mapping() -> None:
    assert filter_subject("events", "*") == "events.>"
    assert filter_subject("events", "public.users.create") == "events.*.public.users.create"
    assert filter_subject("events", "public.*.create") == "events.*.public.*.create"
    assert filter_subject("events", "public.>") == "events.*.public.>"
    with pytest.raises(ValueError, match="invalid pattern"):
        filter_subject("events", "public..x")


async def test_stream_is_created_with_spec_settings(provider: NATSProvider, js: Any) -> None:
    assert isinstance(provider, SupportsConsume)
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


async def test_every_group_gets_every_event_once(provider: NATSProvider) -> None:
    events = _events(20)
    a = provider.consume(group="billing", start="beginning")
    b = provider.consume(group="search", start="beginning")
    async with a, b:
        await provider.publish_many(events)
        got_a = await _take(a, 20)
        got_b = await _take(b, 20)
        await _nothing_more(a)
        await _nothing_more(b)
    assert sorted(_ids(got_a)) == sorted(e.id for e in events) == sorted(_ids(got_b))


async def test_consumers_of_one_group_share_the_work(nats_url: str,
                                                     nats_names: NatsNames) -> None:
    p1 = _provider(nats_url, nats_names, prefetch=5)
    p2 = _provider(nats_url, nats_names, prefetch=5)
    events = _events(60)
    seen: dict[str, list[uuid.UUID]] = {"one": [], "two": []}
    all_seen = anyio.Event()

    async def run(p: NATSProvider, name: str) -> None:
        async with p.consume(group="workers", consumer=name, start="beginning") as it:
            async for d in it:
                seen[name].append(d.event.id)
                await anyio.sleep(0.005)
                await d.ack()
                if len(seen["one"]) + len(seen["two"]) >= len(events):
                    all_seen.set()

    try:
        await p1.publish_many(events[:1])  # creates the stream before both durables race
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, p1, "one")
            tg.start_soon(run, p2, "two")
            await anyio.sleep(0.3)
            await p1.publish_many(events[1:])
            with anyio.fail_after(15):
                await all_seen.wait()
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
    finally:
        await p1.close()
        await p2.close()
    assert seen["one"] and seen["two"], "both consumers got a share"
    assert sorted(seen["one"] + seen["two"]) == sorted(e.id for e in events)


async def test_new_group_starts_at_the_end_unless_told(provider: NATSProvider) -> None:
    await provider.publish_many(_events(3))
    async with provider.consume(group="late") as late, \
            provider.consume(group="early", start="beginning") as early:
        await _nothing_more(late)
        fresh = _events(2)
        await provider.publish_many(fresh)
        assert sorted(_ids(await _take(late, 2))) == sorted(e.id for e in fresh)
        assert len(await _take(early, 5)) == 5


async def test_pattern_becomes_the_durables_filter(provider: NATSProvider, js: Any) -> None:
    users = _events(3, "public.users.create")
    orders = _events(3, "public.orders.create")
    async with provider.consume("public.users.*", group="users-only", start="beginning") as it:
        await provider.publish_many([x for pair in zip(users, orders, strict=True) for x in pair])
        got = await _take(it, 3)
        await _nothing_more(it)
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


async def test_nack_redelivers_then_max_deliveries_dead_letters(nats_url: str,
                                                                nats_names: NatsNames,
                                                                js: Any) -> None:
    p = _provider(nats_url, nats_names, max_deliveries=3, claim_idle=5)
    event = _events(1)[0]
    try:
        async with p.consume(group="g", start="beginning") as it:
            await p.publish(event)
            attempts = []
            for _ in range(3):
                (d,) = await _take(it, 1, ack=False)
                assert d.event.id == event.id
                attempts.append(d.attempt)
                await d.nack(f"boom {d.attempt}", delay=0.05)
            assert attempts == [1, 2, 3]
            await _nothing_more(it, 1.0)
        dead = await p.dead_letters()
        assert len(dead) == 1
        assert "max_deliveries=3" in dead[0]["Outbox-Error"]
        assert "boom 3" in dead[0]["Outbox-Error"]
        assert dead[0]["Outbox-Group"] == "g"
        assert wire.decode(dead[0]["event"]).id == event.id
        info = await js.consumer_info(p.stream_name, "g")
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await p.close()


async def test_park_moves_to_dead_letters_and_terminates(provider: NATSProvider,
                                                         js: Any) -> None:
    events = _events(2)
    async with provider.consume(group="g", start="beginning") as it:
        await provider.publish_many(events)
        first, second = await _take(it, 2, ack=False)
        await first.park("handler gave up: ValueError: nope")
        await second.ack()
        with pytest.raises(ProviderError, match="already settled"):
            await first.ack()
        await _nothing_more(it, 1.5)  # terminated: never redelivered
    dead = await provider.dead_letters()
    assert len(dead) == 1
    assert dead[0]["Outbox-Error"] == "handler gave up: ValueError: nope"
    assert dead[0]["subject"] == (f"{provider.subject_prefix}_dead.g.database."
                                  "public.users.create")
    assert wire.decode(dead[0]["event"]).id == first.event.id


async def test_malformed_messages_are_parked_and_the_consumer_continues(
        provider: NATSProvider, js: Any) -> None:
    good = _events(1)[0]
    subject = f"{provider.subject_prefix}.database.public.users.create"
    async with provider.consume(group="g", start="beginning") as it:
        await provider.publish(good)  # creates the stream
        await js.publish(subject, b"\xff not json")
        await js.publish(subject, json.dumps({"specversion": "0.3"}).encode())
        await provider.publish(good2 := _events(1)[0])
        got = await _take(it, 2)
        assert _ids(got) == [good.id, good2.id]
        await _nothing_more(it, 1.0)
    dead = await provider.dead_letters()
    assert len(dead) == 2
    assert "not JSON" in dead[0]["Outbox-Error"]
    assert "specversion" in dead[1]["Outbox-Error"]


_KILLED_CONSUMER = textwrap.dedent("""
    import asyncio, sys
    from outbox.providers.nats import NATSProvider

    async def main():
        p = NATSProvider(sys.argv[1], stream_name=sys.argv[2], subject_prefix=sys.argv[3],
                         claim_idle=1.0, block=0.2)
        async for d in p.consume(group="g", start="beginning"):
            print(d.event.id, flush=True)   # then hang in the "handler" until killed
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_messages_of_a_killed_consumer_come_back(provider: NATSProvider,
                                                       nats_url: str) -> None:
    events = _events(3)
    await provider.publish_many(events)
    proc = await anyio.open_process(
        [sys.executable, "-c", _KILLED_CONSUMER, nats_url, provider.stream_name,
         provider.subject_prefix],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=None)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 100)
        taken = uuid.UUID(line.decode().strip())
    finally:
        proc.kill()
        await proc.wait()
    async with provider.consume(group="g") as it:
        got = await _take(it, 3, within=20)
    by_id = {d.event.id: d for d in got}
    assert sorted(by_id) == sorted(e.id for e in events)
    assert by_id[taken].attempt == 2


async def test_slow_handler_keeps_its_message(nats_url: str, nats_names: NatsNames) -> None:
    slow = _provider(nats_url, nats_names, claim_idle=1.0)
    other = _provider(nats_url, nats_names, claim_idle=1.0)
    event = _events(1)[0]
    try:
        await slow.publish(event)
        async with slow.consume(group="g", start="beginning") as a, \
                other.consume(group="g", start="beginning") as b:
            (d,) = await _take(a, 1, ack=False)
            await _nothing_more(b, 3.0)  # three ack_wait periods
            await d.ack()
    finally:
        await slow.close()
        await other.close()


# -- storage API -----------------------------------------------------------------------------------


async def test_store_get_list_update_delete(provider: NATSProvider) -> None:
    stored = new_event(source="system", type="job.done", payload={"n": 1}, user_id="u1")
    published = new_event(source="database", type="public.users.create", payload={"n": 2})
    await provider.store(stored)
    await provider.publish(published)
    assert (await provider.get(stored.id)).payload == {"n": 1}  # type: ignore[union-attr]
    assert (await provider.get(published.id)).payload == {"n": 2}  # type: ignore[union-attr]
    assert await provider.get(uuid.uuid4()) is None
    assert [e.id for e in await provider.list(EventFilter(user_id="u1"))] == [stored.id]
    assert len(await provider.list()) == 2
    await provider.update_status(published.id, "completed")
    got = await provider.get(published.id)
    assert got is not None and got.status == "completed"
    await provider.delete(stored.id)
    assert await provider.get(stored.id) is None
    with pytest.raises(EventNotFound):
        await provider.delete(stored.id)


async def test_stream_tails_new_events(provider: NATSProvider) -> None:
    await provider.publish(_events(1, "public.users.create")[0])  # before: not seen
    it = provider.stream("public.users.*")
    events = _events(2) + _events(1, "public.orders.create")

    async def publish_soon() -> None:
        await anyio.sleep(0.5)
        await provider.publish_many(events)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_soon)
        with anyio.fail_after(10):
            got = [await it.__anext__(), await it.__anext__()]
    assert [e.id for e in got] == [e.id for e in events[:2]]


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
        with anyio.fail_after(15):
            while True:
                try:
                    assert await p.publish_many(_events(2)) == [None, None]
                    break
                except ProviderUnavailable:
                    await anyio.sleep(0.2)  # the client reconnects on its own
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
            await _take(it, 2)
            server.stop()
            await anyio.sleep(0.5)
            server.start()
            later = _events(2)
            with anyio.fail_after(20):
                while True:
                    try:
                        await p.publish_many(later)
                        break
                    except ProviderUnavailable:
                        await anyio.sleep(0.2)
            wanted = {e.id for e in later}
            seen: set[uuid.UUID] = set()
            with anyio.fail_after(20):
                while not wanted <= seen:
                    (d,) = await _take(it, 1)
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

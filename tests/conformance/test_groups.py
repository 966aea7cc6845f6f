"""Consumer groups: behaviour every provider shares (``Subscriber.consume`` in
``outbox/providers/base.py``).

Members of one group share its events, every group gets every event its pattern matches, a
delivery is settled once (ack, nack, park), nacked and given-back deliveries come again, parked
and malformed messages land among the dead letters, a member that dies loses what it held to the
others, and a new group starts where it is told. See ``conftest.py`` for how a provider joins.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from outbox import Event, new_event
from outbox.exceptions import ProviderError
from outbox.providers.base import Delivery, GroupMember, Provider, StartPosition
from tests.conformance.conftest import Backend, DeadLetter, ProviderFactory
from tests.helpers import nothing_more, take

pytestmark = pytest.mark.anyio

BEGINNING = StartPosition.BEGINNING
WAIT = 15.0  # seconds a group may take to deliver (real brokers over loopback)


def events(n: int, type_: str = "public.users.create") -> list[Event]:
    return [new_event(source="database", type=type_, payload={"i": i}) for i in range(n)]


def ids(items: list[Delivery] | list[Event]) -> list[uuid.UUID]:
    return [d.event.id if isinstance(d, Delivery) else d.id for d in items]


def require(provider: Provider, capability: str) -> None:
    """The test runs only where :data:`~tests.conformance.conftest.CLAIMS` says the provider
    claims ``capability`` (``needs`` marker); the provider must agree."""
    assert getattr(provider.capabilities, capability), f"{provider.name}: {capability}"


@contextlib.asynccontextmanager
async def other_instance(provider: Provider, make: ProviderFactory,
                         **options: Any) -> AsyncIterator[Provider]:
    """A second provider on the same backend (``provider`` itself where there is no other
    instance to share with: the memory provider)."""
    if not provider.capabilities.cross_instance:
        yield provider
        return
    async with make(**options) as second:
        yield second


async def dead_letters(backend: Backend, provider: Provider, group: str) -> list[DeadLetter]:
    return [d for d in await backend.dead_letters(provider) if d.group == group]


# -- sharing and fan-out -------------------------------------------------------------------------


async def test_every_group_gets_every_event_in_order(provider: Provider,
                                                     backend: Backend) -> None:
    every = provider.consume(group="all", start=BEGINNING)
    orders = provider.consume("orders.>", group="orders", start=BEGINNING)
    async with every, orders:
        await every.open()
        await orders.open()
        published = [new_event(source="database",
                               type="orders.created" if i % 2 else "users.created",
                               payload={"i": i}, ordering_key=f"k{i % 5}") for i in range(20)]
        await provider.publish_many(published)
        got_all = await take(every, 20)
        got_orders = await take(orders, 10)
        await nothing_more(every)
        await nothing_more(orders)
        # One publisher: its order (sharded backends: the order of each key)
        wanted_orders = [e for e in published if e.type.startswith("orders.")]
        for got, wanted in ((got_all, published), (got_orders, wanted_orders)):
            if backend.order_per_key_only:
                assert sorted(ids(got)) == sorted(e.id for e in wanted)
                for key in {e.ordering_key for e in wanted}:
                    assert [d.event.id for d in got if d.event.ordering_key == key] == [
                        e.id for e in wanted if e.ordering_key == key]
            else:
                assert ids(got) == [e.id for e in wanted]
        assert all(d.attempt == 1 for d in got_all + got_orders)
        assert {d.group for d in got_all} == {"all"} and {d.group for d in got_orders} == {
            "orders"}
        assert await backend.unsettled(provider, "all") == 0
        assert await backend.unsettled(provider, "orders") == 0  # the others were acked unseen
        stats = await provider.stats()
        assert stats.events_consumed == 30 and set(stats.extra["groups"]) == {"all", "orders"}


@pytest.mark.needs("total_order")
async def test_members_of_a_group_share_the_work(provider: Provider,
                                                 provider_factory: ProviderFactory) -> None:
    published = events(60)
    seen: dict[uuid.UUID, list[str]] = {}
    all_seen = anyio.Event()

    async def run(member: GroupMember, name: str) -> None:
        async with member:
            async for d in member:
                seen.setdefault(d.event.id, []).append(name)
                await anyio.sleep(0.005)  # a handler that takes a moment: the other one works
                await d.ack()
                if len(seen) >= len(published):
                    all_seen.set()

    async with provider_factory(prefetch=5) as first, \
            other_instance(first, provider_factory, prefetch=5) as second:
        one = first.consume(group="workers", consumer="one", start=BEGINNING)
        two = second.consume(group="workers", consumer="two", start=BEGINNING)
        await one.open()
        await two.open()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, one, "one")
            tg.start_soon(run, two, "two")
            await first.publish_many(published)
            with anyio.fail_after(WAIT):
                await all_seen.wait()
            await anyio.sleep(0.3)  # room for a (wrong) second delivery to show up
            tg.cancel_scope.cancel()
    assert set(seen) == {e.id for e in published}
    assert all(len(who) == 1 for who in seen.values()), "every event exactly once"
    assert {who[0] for who in seen.values()} == {"one", "two"}, "both members had a share"


@pytest.mark.needs("total_order")
async def test_a_group_is_consumed_with_one_pattern(provider: Provider,
                                                    backend: Backend) -> None:
    users = events(3, "public.users.create")
    orders = events(3, "public.orders.create")
    async with provider.consume("public.users.*", group="users-only", start=BEGINNING) as it:
        await it.open()
        await provider.publish_many([x for pair in zip(users, orders, strict=True) for x in pair])
        got = await take(it, 3)
        await nothing_more(it)
        # Another pattern for the same group would acknowledge events this one needs.
        with pytest.raises(ProviderError, match="already consumed with pattern"):
            other = provider.consume("public.orders.*", group="users-only")
            async with other:
                await other.__anext__()
        assert ids(got) == [e.id for e in users]
        assert await backend.unsettled(provider, "users-only") == 0


# -- start positions -----------------------------------------------------------------------------


@pytest.mark.needs("total_order")
async def test_a_new_group_starts_at_the_end_unless_told(provider: Provider) -> None:
    old = events(3)
    await provider.publish_many(old)
    late = provider.consume(group="late")
    early = provider.consume(group="early", start=BEGINNING)
    async with late, early:
        await late.open()  # the group starts now, not at the first pull
        await early.open()
        await nothing_more(late)
        fresh = events(2)
        await provider.publish_many(fresh)
        assert ids(await take(late, 2)) == ids(fresh)
        first_time = await take(early, 5, ack=False)
        assert ids(first_time) == ids(old + fresh)
    # `start` applies only to a new group: "early" resumes where it was (nothing was acked, so
    # everything comes again), it does not restart at "now".
    async with provider.consume(group="early", start=StartPosition.NOW) as again:
        second_time = await take(again, 5)
        assert ids(second_time) == ids(old + fresh)
        assert all(d.attempt == 2 for d in second_time)
        await nothing_more(again)


# -- settling ------------------------------------------------------------------------------------


async def test_nack_redelivers_after_its_delay_and_park_ends_it(provider: Provider,
                                                                backend: Backend) -> None:
    bad, good = events(2)
    async with provider.consume(group="g", start=BEGINNING) as it:
        await it.open()
        await provider.publish_many([bad, good])
        first, second = await take(it, 2, ack=False)
        if backend.order_per_key_only:  # shards: two keys' events come in either order
            first, second = sorted((first, second), key=lambda d: d.event.id != bad.id)
        assert first.event.id == bad.id
        await second.ack()
        await first.nack("try again", delay=0.05)
        with pytest.raises(ProviderError, match="already settled"):
            await first.ack()
        (again,) = await take(it, 1, ack=False)
        assert (again.event.id, again.attempt, again.last_error) == (bad.id, 2, "try again")
        await again.park("gave up")
        await nothing_more(it)
        assert await dead_letters(backend, provider, "g") == [
            DeadLetter(str(bad.id), "g", "gave up", 2)]
        assert await backend.unsettled(provider, "g") == 0


async def test_park_moves_to_the_dead_letters_never_to_return(provider: Provider,
                                                              backend: Backend) -> None:
    pair = events(2)
    async with provider.consume(group="g", start=BEGINNING) as it:
        await it.open()
        await provider.publish_many(pair)
        first, second = await take(it, 2, ack=False)
        await first.park("handler gave up: ValueError: nope")
        await second.ack()
        with pytest.raises(ProviderError, match="already settled"):
            await first.ack()
        await nothing_more(it, 1.5)  # parked: never redelivered
        assert await dead_letters(backend, provider, "g") == [
            DeadLetter(str(first.event.id), "g", "handler gave up: ValueError: nope", 1)]
        assert await backend.unsettled(provider, "g") == 0


@pytest.mark.needs("bounded_redelivery")
async def test_redelivery_is_bounded_by_max_deliveries(provider_factory: ProviderFactory,
                                                       backend: Backend) -> None:
    event = events(1)[0]
    async with provider_factory(max_deliveries=3, claim_timeout=5.0) as provider:
        require(provider, "bounded_redelivery")
        async with provider.consume(group="g", start=BEGINNING) as it:
            await it.open()
            await provider.publish(event)
            attempts = []
            for _ in range(3):
                (d,) = await take(it, 1, ack=False)
                assert d.event.id == event.id
                attempts.append(d.attempt)
                await d.nack(f"boom {d.attempt}", delay=0.05)
            assert attempts == [1, 2, 3]
            await nothing_more(it, 1.0)
        (dead,) = await dead_letters(backend, provider, "g")
        assert dead.event_id == str(event.id)
        assert "max_deliveries=3" in dead.error and "boom 3" in dead.error
        assert dead.deliveries == 3
        assert await backend.unsettled(provider, "g") == 0


@pytest.mark.needs("malformed", "total_order")
async def test_malformed_messages_are_parked_and_the_group_goes_on(provider: Provider,
                                                                   backend: Backend) -> None:
    assert backend.inject_malformed is not None
    good, later = events(2)
    async with provider.consume(group="g", start=BEGINNING) as it:
        await it.open()
        await provider.publish(good)
        expected = await backend.inject_malformed(provider)
        await provider.publish(later)
        assert ids(await take(it, 2)) == [good.id, later.id]
        await nothing_more(it, 1.0)
        dead = await dead_letters(backend, provider, "g")
        assert len(dead) == len(expected)
        for letter, fragment in zip(dead, expected, strict=True):
            assert letter.error.startswith("malformed:") and fragment in letter.error
            assert letter.deliveries == 1
        assert await backend.unsettled(provider, "g") == 0


# -- members that stop -----------------------------------------------------------------------------


@pytest.mark.needs("total_order")
async def test_closing_gives_back_what_a_member_held_at_once(
        provider_factory: ProviderFactory) -> None:
    published = events(5)
    async with provider_factory(claim_timeout=30.0, prefetch=10) as provider, \
            other_instance(provider, provider_factory, claim_timeout=30.0) as second:
        first = provider.consume(group="g", consumer="first", start=BEGINNING)
        await first.open()
        await provider.publish_many(published)
        held = await take(first, 3, ack=False)  # the rest may sit in its buffer
        await held[0].ack()
        await first.aclose()  # not after the 30 s claim timeout: now
        async with second.consume(group="g", consumer="second") as it:
            again = await take(it, 4, within=10)
            await nothing_more(it)
    assert ids(again) == [e.id for e in published[1:]]
    handed_out = {d.event.id for d in held[1:]}
    assert all(d.attempt == 2 for d in again if d.event.id in handed_out)


#: A member that prints the id of its first delivery, then hangs in its "handler" until killed.
_DYING_MEMBER = """
import asyncio

async def main():
    async for d in provider.consume(group="g", consumer="doomed", start="beginning"):
        print(d.event.id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.needs("cross_instance")
async def test_what_a_dead_member_held_goes_to_the_others(provider_factory: ProviderFactory,
                                                         backend: Backend) -> None:
    published = events(3)
    async with provider_factory(claim_timeout=1.0) as provider:
        require(provider, "cross_instance")
        assert backend.child is not None
        await provider.publish_many(published)
        proc = await anyio.open_process(
            [sys.executable, "-c", backend.child + _DYING_MEMBER],
            env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=None)
        try:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 100)
            taken = uuid.UUID(line.decode().strip())
        finally:
            proc.kill()  # mid-handler: nothing it held was settled or given back
            await proc.wait()
        async with provider.consume(group="g", consumer="survivor") as it:
            got = await take(it, 3, within=20)
    by_id = {d.event.id: d for d in got}
    assert sorted(by_id) == sorted(e.id for e in published)
    assert by_id[taken].attempt == 2  # the one it was handling comes back, counted


@pytest.mark.needs("cross_instance")
async def test_a_slow_handler_keeps_its_delivery(provider_factory: ProviderFactory) -> None:
    """A handler that runs longer than the claim timeout is not mistaken for a dead member."""
    event = events(1)[0]
    async with provider_factory(claim_timeout=1.0) as slow, \
            provider_factory(claim_timeout=1.0) as other:
        require(slow, "cross_instance")
        a = slow.consume(group="g", consumer="slow", start=BEGINNING)
        b = other.consume(group="g", consumer="other", start=BEGINNING)
        async with a, b:
            await a.open()
            await b.open()
            await slow.publish(event)
            (d,) = await take(a, 1, ack=False)
            await nothing_more(b, 3.0)  # three claim timeouts
            await d.ack()

"""Partitioned JetStream groups (``nats.partitions`` > 1): per-key order across the members of a
group while members crash (without settling), join and leave."""

from __future__ import annotations

from typing import Any

import pytest

from outbox import new_event, wire
from outbox.providers._bus import shard_of
from outbox.providers.nats import NATSProvider, filter_subject
from tests import order_scenario

pytestmark = pytest.mark.anyio

PARTITIONS = 4


def _provider(url: str, names: Any) -> NATSProvider:
    return NATSProvider(
        url,
        stream_name=names.stream,
        subject_prefix=names.subject_prefix,
        partitions=PARTITIONS,
        claim_idle=1.0,
        block=0.2,
    )


def test_partition_subjects() -> None:
    event = new_event(source="database", type="public.users.create", payload={}, ordering_key="42")
    p = NATSProvider(partitions=PARTITIONS)
    assert p.subject(event) == f"events.{shard_of(event, PARTITIONS)}.database.public.users.create"
    assert (
        filter_subject("events", "public.*.create", partitions=4, partition=2)
        == "events.2.*.public.*.create"
    )
    assert filter_subject("events", "*", partitions=4) == "events.*.>"


async def test_the_wire_is_unchanged_but_the_subject(nats_url: str, nats_names: Any) -> None:
    p = _provider(nats_url, nats_names)
    try:
        events = [
            new_event(source="s", type="t.x", payload={"i": i}, ordering_key=f"k{i}")
            for i in range(8)
        ]
        async with p.consume("t.*", group="g", start="beginning") as reader:
            assert await p.publish_many(events) == [None] * 8
            got = []
            for _ in range(8):  # one message in flight per partition: ack to get the next
                got.append(await reader.__anext__())
                await got[-1].ack()
        assert sorted(str(d.event.id) for d in got) == sorted(str(e.id) for e in events)
        assert all(
            wire.encode(d.event) == wire.encode(e)
            for d in got
            for e in events
            if d.event.id == e.id
        )
    finally:
        await p.close()


async def test_per_key_order_across_members_that_crash(nats_url: str, nats_names: Any) -> None:

    async def kill(provider: NATSProvider) -> None:
        await provider._conn.nc.close()

    await order_scenario.check(lambda: _provider(nats_url, nats_names), kill)

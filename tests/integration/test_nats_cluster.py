"""NATS JetStream on a cluster of three servers: a stream with ``replicas`` 3 loses nothing and
its consumers go on when one server is killed mid-stream (and restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from outbox import new_event
from outbox.exceptions import ProviderUnavailable
from outbox.providers.nats import NATSProvider
from tests import servers
from tests.helpers import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _provider(url: str, **options: Any) -> NATSProvider:
    return NATSProvider(
        url,
        stream_name="OUTBOX_CLUSTER",
        subject_prefix="cluster",
        replicas=3,
        claim_idle=2.0,
        block=0.2,
        request_timeout=2.0,
        connect_timeout=2.0,
        reconnect_wait=0.2,
        **options,
    )


async def _until_ready(provider: NATSProvider, within: float = 30.0) -> None:
    """The cluster elected its JetStream leaders and the replicated stream exists."""
    deadline = time.monotonic() + within
    while True:
        try:
            await provider.publish_many([])
            await provider._conn.get()
            return
        except ProviderUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def test_a_server_killed_mid_stream_loses_nothing(
    private_nats_cluster: servers.PrivateNatsCluster,
) -> None:
    url = private_nats_cluster.url
    relay, member = _provider(url), _provider(url)
    published: list[str] = []
    received: set[str] = set()
    try:
        await _until_ready(relay)
        info = await relay._conn.js.stream_info("OUTBOX_CLUSTER")
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2

        async def consume() -> None:
            async with member.consume(group="g", start="beginning") as reader:
                async for delivery in reader:
                    received.add(str(delivery.event.id))
                    with contextlib.suppress(ProviderUnavailable):  # redelivered: same id
                        await delivery.ack()

        task = asyncio.create_task(consume())
        killed_at, retries = 20, 0
        victim = private_nats_cluster.servers[0]
        for step in range(60):
            batch = [new_event(source="s", type="t.x", payload={"step": step}) for _ in range(50)]
            while True:  # what the relay does: hold the batch and retry, deduped by id
                try:
                    assert await asyncio.wait_for(relay.publish_many(batch), 15) == [None] * len(
                        batch
                    )
                    break
                except ProviderUnavailable:
                    retries += 1
                    await asyncio.sleep(0.2)
            published.extend(str(e.id) for e in batch)
            if step == killed_at:  # SIGKILL the relay's server, mid-stream
                port = relay._conn.nc.connected_url.port
                victim = next(x for x in private_nats_cluster.servers if x.port == port)
                victim.stop()
            if step == 45:
                victim.start()
            await asyncio.sleep(0.02)
        await eventually(
            lambda: set(published) <= received,
            within=30,
            what=lambda: f"{len(set(published) - received)} events not received",
        )
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)
        lost = set(published) - received
        assert not lost, f"{len(lost)} of {len(published)} events lost ({retries} retries)"
        info = await relay._conn.js.stream_info("OUTBOX_CLUSTER")
        assert info.state.messages == len(published)  # nothing stored twice
        assert relay._conn.nc.connected_url.port != victim.port or victim.proc is not None
    finally:
        await asyncio.wait_for(member.close(), 15)
        await asyncio.wait_for(relay.close(), 15)

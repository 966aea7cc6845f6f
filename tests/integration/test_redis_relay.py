"""Relay → Redis Streams end to end: fan-out to groups, a killed member, SDK parsing, outage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from outbox.providers.redis import RedisProvider
from tests import servers
from tests.bus_helpers import fanout_scenario, outage_scenario, write_config


def _reader(url: str, stream: str, field: bytes) -> Callable[[], Any]:
    async def read() -> list[Any]:
        client = aioredis.Redis.from_url(url)
        try:
            entries = await client.xrange(stream)
        finally:
            await client.aclose()
        return [fields[field] if field == b"event" else fields[field].decode()
                for _entry, fields in entries]

    return read


def test_relay_fans_out_to_groups_and_survives_a_killed_member(
        tmp_path: Path, pg_url: str, pg_engine: sa.Engine, redis_url: str,
        redis_prefix: str) -> None:
    stream = f"{redis_prefix}:events"
    config = write_config(tmp_path, provider="redis", redis_url=redis_url, stream=stream,
                          claim_idle=1.0)
    fanout_scenario(
        tmp_path, config, "redis", pg_engine, pg_url,
        make_provider=lambda: RedisProvider(redis_url, stream_name=stream, max_len=100_000),
        read_documents=_reader(redis_url, stream, b"event"),
    )


@pytest.mark.slow
def test_outage_loses_nothing_and_fails_nothing(pg_url: str, pg_engine: sa.Engine) -> None:
    # appendonly + fsync always: the restarted server has what it acknowledged before the kill.
    server = servers.PrivateRedis(args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        outage_scenario(
            pg_engine, pg_url, server,
            make_provider=lambda: RedisProvider(server.url, stream_name="outage",
                                                max_len=1_000_000, connect_timeout=1,
                                                socket_timeout=2),
            read_ids=_reader(server.url, "outage", b"id"),
        )
    finally:
        server.close()

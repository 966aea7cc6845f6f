"""Relay → NATS JetStream end to end: fan-out to durables, a killed member, SDK parsing, outage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox.providers.nats import MSG_ID_HEADER, NATSProvider
from tests import servers
from tests.bus_helpers import fanout_scenario, outage_scenario, write_config
from tests.conftest import NatsNames


def _reader(url: str, stream: str, prefix: str, what: str) -> Callable[[], Any]:
    async def read() -> list[Any]:
        provider = NATSProvider(url, stream_name=stream, subject_prefix=prefix)
        try:
            await provider.ping()
            return [msg.data if what == "event" else msg.headers[MSG_ID_HEADER]
                    async for msg in provider._conn.scan(stream, f"{prefix}.>")]
        finally:
            await provider.close()

    return read


def test_relay_fans_out_to_durables_and_survives_a_killed_member(
        tmp_path: Path, pg_url: str, pg_engine: sa.Engine, nats_url: str,
        nats_names: NatsNames) -> None:
    config = write_config(tmp_path, provider="nats", nats_url=nats_url, stream=nats_names.stream,
                          subject_prefix=nats_names.subject_prefix, claim_idle=1.0)
    fanout_scenario(
        tmp_path, config, "nats", pg_engine, pg_url,
        make_provider=lambda: NATSProvider(nats_url, stream_name=nats_names.stream,
                                           subject_prefix=nats_names.subject_prefix),
        read_documents=_reader(nats_url, nats_names.stream, nats_names.subject_prefix, "event"),
    )


@pytest.mark.slow
def test_outage_loses_nothing_and_fails_nothing(pg_url: str, pg_engine: sa.Engine) -> None:
    server = servers.PrivateNats()
    server.start()
    try:
        outage_scenario(
            pg_engine, pg_url, server,
            make_provider=lambda: NATSProvider(server.url, connect_timeout=1, request_timeout=2,
                                               reconnect_wait=0.25),
            read_ids=_reader(server.url, "OUTBOX_EVENTS", "events", "id"),
        )
    finally:
        server.close()

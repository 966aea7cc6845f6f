"""NATSProvider over TLS with a client certificate (a private nats-server requiring it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox import new_event
from outbox.exceptions import ProviderUnavailable
from outbox.providers.nats import NATSProvider
from tests import servers
from tests.bus_helpers import make_certificates

pytestmark = pytest.mark.anyio


async def test_tls_with_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    server = servers.PrivateNats(args=(
        "--tls", "--tlscert", str(certs.server_cert), "--tlskey", str(certs.server_key),
        "--tlscacert", str(certs.ca), "--tlsverify"))
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    try:
        good = NATSProvider(url, ca_file=str(certs.ca), cert_file=str(certs.client_cert),
                            key_file=str(certs.client_key), connect_timeout=2)
        await good.publish(new_event(source="system", type="tls.works"))
        assert (await good.stats()).total_events == 1
        await good.close()
        no_cert = NATSProvider(url, ca_file=str(certs.ca), connect_timeout=1,
                               reconnect_wait=0.1)
        with pytest.raises(ProviderUnavailable):
            await no_cert.ping()
        await no_cert.close()
    finally:
        server.close()

"""RedisProvider over TLS with a client certificate (a private redis-server with TLS only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox import new_event
from outbox.exceptions import ProviderUnavailable
from outbox.providers.redis import RedisProvider
from tests import servers
from tests.bus_helpers import make_certificates

pytestmark = pytest.mark.anyio


async def test_tls_with_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    port = servers.free_port()
    server = servers.PrivateRedis(port=port, args=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes"))
    server.start()
    try:
        good = RedisProvider(f"rediss://127.0.0.1:{port}/0", stream_name="tls",
                             ca_file=str(certs.ca), cert_file=str(certs.client_cert),
                             key_file=str(certs.client_key), connect_timeout=2)
        await good.publish(new_event(source="system", type="tls.works"))
        assert (await good.stats()).extra["stream_length"] == 1
        await good.close()
        # tls=True upgrades a redis:// URL; without the client certificate the server refuses.
        no_cert = RedisProvider(f"redis://127.0.0.1:{port}/0", tls=True, stream_name="tls",
                                ca_file=str(certs.ca), connect_timeout=2)
        with pytest.raises(ProviderUnavailable):
            await no_cert.ping()
        await no_cert.close()
        # Without our CA the server's certificate is not trusted.
        untrusted = RedisProvider(f"rediss://127.0.0.1:{port}/0", stream_name="tls",
                                  cert_file=str(certs.client_cert),
                                  key_file=str(certs.client_key), connect_timeout=2)
        with pytest.raises(ProviderUnavailable):
            await untrusted.ping()
        await untrusted.close()
    finally:
        server.close()

"""/healthz and /readyz: the self-query and the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from interceptor.node.health import HealthServer, self_query
from interceptor.settings import Endpoint

# ----------------------------------------------------------------------------- health


def test_health_self_query_reports_a_silent_resolver(tmp_path: Path) -> None:
    async def run() -> tuple[bool, str]:
        # A UDP socket that never answers: the probe must time out, not hang.
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            return await self_query(Endpoint("127.0.0.1", port), "cluster.local", timeout=0.2)
        finally:
            transport.close()

    ok, why = asyncio.run(run())
    assert not ok and "did not answer" in why


def test_health_server_awaits_async_checks() -> None:
    async def run() -> bytes:
        async def alive() -> tuple[bool, str]:
            return False, "resolver down"

        server = HealthServer(Endpoint("127.0.0.1", 0), lambda: (True, "ok"), alive)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data
        finally:
            await server.close()

    data = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 503") and data.endswith(b"resolver down\n")

"""recvmmsg/sendmmsg batches on real loopback sockets, IPv4 and IPv6: every reply reaches
the socket its datagram came from, misses and oversized replies come back to the caller
with the right peer, and a batch is reused cleanly."""

from __future__ import annotations

import socket
import time

import pytest

from interceptor.resolve import batchio
from interceptor.resolve.batchio import DatagramBatch, Peer

pytestmark = pytest.mark.skipif(not batchio.available(), reason="no recvmmsg/sendmmsg")


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_replies_go_back_to_each_sender(family: int, host: str) -> None:
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    server.setblocking(False)
    clients = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        batch = DatagramBatch(server, size=16, slot=512)
        for round_ in range(3):  # the same buffers, reused
            for i, c in enumerate(clients):
                c.sendto(f"q{round_}-{i}".encode(), server.getsockname())
            clients[0].sendto(b"miss", server.getsockname())
            clients[1].sendto(b"big", server.getsockname())
            time.sleep(0.05)
            n = batch.receive()
            assert n == 7

            def fast(data: bytes, peer: Peer) -> bytes | None:
                if data == b"miss":
                    return None
                if data == b"big":
                    return b"x" * 600
                return b"answer to " + data + f" from port {peer[1]}".encode()

            queued, missed, big = batch.answer(n, fast)
            assert queued == 5
            assert [(d, p[1]) for d, p in missed] == [(b"miss", clients[0].getsockname()[1])]
            assert [(len(r), p[1]) for r, p in big] == [(600, clients[1].getsockname()[1])]
            assert batch.flush() == (5, 0)
            for i, c in enumerate(clients):
                c.settimeout(1)
                got, src = c.recvfrom(1000)
                port = c.getsockname()[1]
                assert got == f"answer to q{round_}-{i} from port {port}".encode()
                assert src[1] == server.getsockname()[1]
            assert batch.receive() == 0  # nothing waiting: no error, no block
    finally:
        server.close()
        for c in clients:
            c.close()


def test_a_datagram_longer_than_a_slot_is_cut_as_recvfrom_would() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        batch = DatagramBatch(server, size=4, slot=64)
        client.sendto(b"y" * 100, server.getsockname())
        time.sleep(0.05)
        assert batch.receive() == 1
        seen: list[bytes] = []
        batch.answer(1, lambda data, peer: seen.append(data) or None)
        assert seen == [b"y" * 64]
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("batched", [True, False], ids=["recvmmsg", "recvfrom"])
def test_the_udp_server_answers_both_ways(batched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """UdpServer with batches and with its one-by-one fallback (a platform without
    recvmmsg): hot answers, careful answers and the peer's own port, the same either way."""
    import asyncio

    import dns.message
    import dns.rcode

    from interceptor.model.servicemap import ServiceMap
    from interceptor.resolve import listener
    from interceptor.resolve.resolver import Resolver
    from interceptor.settings import Endpoint, Settings, ZoneSettings
    from tests.unit.fakes import FakeForwarder
    from tests.unit.test_servicemap import svc

    monkeypatch.setattr(listener.batchio, "available", lambda: batched)
    smap = ServiceMap(ZoneSettings())
    smap.replace([svc("web", ip="10.96.0.5")])
    resolver = Resolver(smap, FakeForwarder({}), Settings(), [Endpoint("192.0.2.53", 53)])

    async def run() -> list[tuple[int, list[str]]]:
        sock = listener.bind_socket(Endpoint("127.0.0.1", 0), socket.SOCK_DGRAM)
        server = listener.UdpServer(resolver, sock)
        assert (server.batch is not None) == batched
        server.start()
        loop = asyncio.get_running_loop()
        out = []
        try:
            for name in ("web.ns1.svc.cluster.local", "nothere.ns1.svc.cluster.local") * 2:
                client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                client.setblocking(False)
                q = dns.message.make_query(name, "A")
                await loop.sock_sendto(client, q.to_wire(), sock.getsockname())
                data = await asyncio.wait_for(loop.sock_recv(client, 4096), 2)
                r = dns.message.from_wire(data)
                assert r.id == q.id
                out.append((r.rcode(), [rr.to_text() for a in r.answer for rr in a]))
                client.close()
        finally:
            server.close()
        return out

    got = asyncio.run(run())
    hit, junk = (dns.rcode.NOERROR, ["10.96.0.5"]), (dns.rcode.NXDOMAIN, [])
    assert got == [hit, junk, hit, junk]

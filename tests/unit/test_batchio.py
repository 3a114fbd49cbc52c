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

"""TCP connections shared fairly: a client holds at most its share, a client with fewer
connections takes the busiest one's idlest at the global limit, and idle connections close
sooner as the limit nears; another client's TCP DNS keeps working throughout."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import dns.message
import pytest

from devlab.netns import stop
from tests.helpers import Served, start_serve

NAME = "svc1.ns1.svc.cluster.local"


@pytest.fixture
def served() -> Iterator[Served]:
    s = start_serve(
        "--tcp-max-connections", "20", "--tcp-client-connections", "8",
        "--tcp-idle-timeout", "3",
    )  # fmt: skip
    yield s
    stop(s.proc)


def connect(served: Served, source: str) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.bind((source, 0))
    c.settimeout(2)
    c.connect((served.host, served.port))
    return c


def works(c: socket.socket) -> bool:
    """One query on an open connection gets its answer."""
    q = dns.message.make_query(NAME, "A").to_wire()
    try:
        c.sendall(struct.pack("!H", len(q)) + q)
        head = c.recv(2)
        if len(head) < 2:
            return False
        (n,) = struct.unpack("!H", head)
        data = b""
        while len(data) < n:
            chunk = c.recv(n - len(data))
            if not chunk:
                return False
            data += chunk
        return dns.message.from_wire(data).rcode() == 0
    except OSError:
        return False


def test_one_client_holds_its_share_and_others_still_resolve(served: Served) -> None:
    hog = [connect(served, "127.0.0.1") for _ in range(30)]
    time.sleep(0.3)
    alive = [c for c in hog if works(c)]
    assert len(alive) == 8, len(alive)
    other = connect(served, "127.0.0.2")
    assert works(other)
    for c in [*hog, other]:
        c.close()


def test_at_the_limit_a_client_with_fewer_takes_the_busiest_ones_idlest(served: Served) -> None:
    held = {f"127.0.0.{i}": [connect(served, f"127.0.0.{i}") for _ in range(8)] for i in (1, 2)}
    for conns in held.values():
        assert all(works(c) for c in conns)  # 16 of 20
    late = [connect(served, "127.0.0.3") for _ in range(8)]
    time.sleep(0.3)
    # Room was made from the busiest clients until the shares were even (20 / 3).
    held["127.0.0.3"] = late
    shares = {ip: sum(works(c) for c in conns) for ip, conns in held.items()}
    assert all(6 <= n <= 8 for n in shares.values()), shares
    assert sum(shares.values()) <= 20, shares
    for c in [*late, *(c for conns in held.values() for c in conns)]:
        c.close()


def test_idle_connections_close_sooner_near_the_limit(served: Served) -> None:
    conns = [connect(served, f"127.0.0.{i}") for i in range(1, 3) for _ in range(8)]  # 16/20
    assert all(works(c) for c in conns)
    t0 = time.monotonic()
    # Load 0.8: the 3 s idle timeout becomes max(0.5, 3 * 2 * 0.2) = 1.2 s.
    conns[0].settimeout(5)
    assert conns[0].recv(1) == b""  # closed by the server
    assert time.monotonic() - t0 < 2.5
    for c in conns:
        c.close()

"""Hot forwarded names answered in the kernel from the resolver's cache (FP_CACHE): once the
resolver has served a cached answer often enough, the kernel gives it, byte for byte what
the resolver gives at the same moment, TTLs counted down the same way; it stops at the last
tenth of the entry's life so the resolver refreshes it; answers are kept per server the pod
asked; and a mesh change takes them all back at once.  Root only."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator

import pytest

from interceptor.dns import wire
from interceptor.dns.message import parse_query
from interceptor.resolve.cache import ttl_fields
from tests.lab.conftest import Node, make_node
from tests.lab.test_fastpath import SERVER, fp_stats, probe, query, variants

NAMES = ["cached.upstream.test", "alias.upstream.test", "short.upstream.test"]
"""short.upstream.test's TTL (5) is below --cache-min-ttl (12): it is cached 12 s and served
with its own TTL counted down to 0, where the others are served with the seconds left."""
SERVER6 = "fd00:96::a"


@pytest.fixture(scope="module")
def cnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    for n in make_node("ptp", tmp_path_factory.mktemp("kcache")):
        n.start_agent("--fastpath-cached-hits=2", "--cache-min-ttl=12")
        yield n


def reply_bytes(r: dict[str, object]) -> bytes:
    assert isinstance(r["reply"], str), "no reply"
    return bytes.fromhex(r["reply"])


def split_ttls(msg: bytes) -> tuple[bytes, list[int]]:
    """The message with its TTL fields zeroed, and the TTLs."""
    offsets, ttls, _ = ttl_fields(msg)
    out = bytearray(msg)
    for off in offsets:
        out[off : off + 4] = b"\0\0\0\0"
    return bytes(out), ttls


def kernel_round(node: Node, pod: str, server: str, queries: list[bytes]) -> tuple[list, int]:
    """Replies, and how many of them the kernel gave from FP_CACHE."""
    before = fp_stats(node)["cached"]
    replies = probe(node, pod, server, queries)
    return replies, fp_stats(node)["cached"] - before


def warm(node: Node, queries: list[bytes], server: str = SERVER, pod: str = "client1") -> list:
    """Ask until every query is answered from FP_CACHE; returns the last round's replies."""
    deadline = time.monotonic() + 10
    while True:
        replies, cached = kernel_round(node, pod, server, queries)
        if cached == len(queries):
            return replies
        if time.monotonic() >= deadline:
            missed = [q for q in queries if kernel_round(node, pod, server, [q])[1] == 0]
            raise AssertionError(f"not from FP_CACHE: {[parse_query(q) for q in missed]}")
        time.sleep(0.3)


def drop_kernel_copies(node: Node) -> int:
    with node.pinned_maps() as maps:
        keys = list(maps["FP_CACHE"].keys())
        for k in keys:
            maps["FP_CACHE"].delete(k)
        return len(keys)


def test_kernel_cached_answers_equal_the_resolvers_at_the_same_moment(cnode: Node) -> None:
    queries = variants(NAMES, random.Random(5))
    first = probe(cnode, "client1", SERVER, queries)  # the resolver's (cache misses, then hits)
    warm(cnode, queries)
    time.sleep(2.2)  # so that the TTLs have counted down
    from_kernel, cached = kernel_round(cnode, "client1", SERVER, queries)
    assert cached == len(queries)
    assert drop_kernel_copies(cnode) > 0
    from_resolver, cached = kernel_round(cnode, "client1", SERVER, queries)
    assert cached == 0, "the kernel answered after its copies were removed"
    for q, f, k, u in zip(queries, first, from_kernel, from_resolver, strict=True):
        assert k["csum_ok"]
        kb, ub = reply_bytes(k), reply_bytes(u)
        (k_masked, k_ttls), (u_masked, u_ttls) = split_ttls(kb), split_ttls(ub)
        assert k_masked == u_masked, f"{q.hex()}: kernel {kb.hex()} resolver {ub.hex()}"
        assert k_masked == split_ttls(reply_bytes(f))[0]
        # Counted down as the resolver counts.  The two rounds are a moment apart, and a
        # whole second may end between them, so the resolver's may be one lower (and, as it
        # rounds its clock, one higher); without the kernel's own count-down it is 2 lower.
        assert all(-1 <= u - k <= 1 for k, u in zip(k_ttls, u_ttls, strict=True)), (k_ttls, u_ttls)
        assert max(k_ttls, default=0) <= (3 if b"\x05short" in q else 298), k_ttls


def test_an_ipv6_server_is_a_route_of_its_own(cnode: Node) -> None:
    """By default a forwarded name goes to the server the pod asked, so the kernel keys its
    copies by that server: what was cached for 10.96.0.10 is not answered for fd00:96::a."""
    q = [query("other.upstream.test", wire.A, qid=606)]
    warm(cnode, q)
    replies, cached = kernel_round(cnode, "client1", SERVER6, q)
    assert cached == 0
    assert bytes([192, 0, 2, 62]).hex() in str(replies[0]["reply"])
    warm(cnode, q, server=SERVER6)  # and it gets its own copy once hot


def test_the_kernel_stops_at_the_last_tenth_and_the_refresh_goes_down(cnode: Node) -> None:
    """brief.upstream.test (TTL 8) is cached for --cache-min-ttl, 12 s: the kernel answers
    until 10.8 s, the resolver refreshes it (prefetch), and the fresh copy is answered in the
    kernel again."""
    name = "brief.upstream.test"
    q = [query(name, wire.A, qid=808)]
    asked = len(cnode.upstream_queries(name))
    warm(cnode, q)
    t0 = time.monotonic()
    seen: list[tuple[float, bool, int]] = []
    while time.monotonic() - t0 < 16:
        replies, cached = kernel_round(cnode, "client1", SERVER, q)
        ttl = split_ttls(reply_bytes(replies[0]))[1][0]
        seen.append((time.monotonic() - t0, cached == 1, ttl))
        time.sleep(0.2)
    kernel = [s for s in seen if s[1]]
    resolver = [s for s in seen if not s[1]]
    assert resolver, f"the resolver never saw the name again: {seen}"
    assert len(cnode.upstream_queries(name)) >= asked + 2, "never refreshed"
    # After the resolver's turn, the fresh copy is the kernel's again, with a fresh TTL.
    later = [s for s in kernel if s[0] > resolver[0][0]]
    assert later and max(s[2] for s in later) >= 6, seen
    assert all(s[2] <= 8 for s in seen)


def test_a_mesh_change_takes_the_kernel_copies_back_at_once(cnode: Node) -> None:
    q = [query("other.upstream.test", wire.A, qid=909)]
    warm(cnode, q)
    text = cnode.source.read_text()
    try:
        with cnode.source.open("a") as f:
            f.write(
                "- {apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: "
                "{name: wild, namespace: ns1, creationTimestamp: '2024-03-01T00:00:00Z'}, "
                "spec: {hosts: ['*.upstream.test'], addresses: [192.0.2.99], "
                "resolution: STATIC}}\n"
            )
        deadline = time.monotonic() + 5
        while True:
            replies, cached = kernel_round(cnode, "client1", SERVER, q)
            if bytes([192, 0, 2, 99]).hex() in str(replies[0]["reply"]):
                break
            assert time.monotonic() < deadline, "the wildcard mesh host never answered"
            time.sleep(0.1)
        assert cached == 0
        with cnode.pinned_maps() as maps:
            assert not list(maps["FP_CACHE"].keys())
    finally:
        cnode.source.write_text(text)
    rcode = struct.unpack("!H", reply_bytes(probe(cnode, "client1", SERVER, q)[0])[2:4])[0]
    assert rcode & 0xF == wire.NOERROR

"""The cache's hot path (bytes in, bytes out) against the careful path: byte for byte the
same answer at the same moment, for every variation of a query a client may send, and None
(the careful path decides) whenever something is due: a miss, expiry, prefetch, a mesh
change, truncation, a route that needs a decision."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode

from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.cache import Cache
from interceptor.resolve.resolver import Resolver
from interceptor.settings import (
    AutopathSettings,
    Endpoint,
    Settings,
    UpstreamSettings,
    ZoneSettings,
)
from tests.unit.fakes import FakeForwarder
from tests.unit.test_servicemap import se, svc

CLIENT = ("10.0.0.7", 40000)
RECORDS = {
    "www.example.org": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"]},
    "big.example.org": {"TXT": [f'"{"x" * 200}"', f'"{"y" * 200}"', f'"{"z" * 200}"']},
    "svc.mesh.test": {"A": ["192.0.2.9"]},
}


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def resolver(
    settings: Settings | None = None, asked: dict[tuple[str, int], str] | None = None
) -> tuple[Resolver, FakeForwarder, Clock, ServiceMap]:
    clock = Clock()
    m = ServiceMap(ZoneSettings())
    m.replace([])
    fwd = FakeForwarder(RECORDS)
    original = (lambda ip, port, tcp: asked.get((ip, port))) if asked is not None else None
    r = Resolver(
        m,
        fwd,
        settings or Settings(),
        [Endpoint("192.0.2.53", 53)],
        original_destination=original,
        cache=Cache(clock=clock),
    )
    return r, fwd, clock, m


def query(
    name: str,
    rtype: str,
    qid: int,
    edns: bool = False,
    do: bool = False,
    cd: bool = False,
    rd: bool = True,
    cookie: bool = False,
    payload: int = 1232,
) -> bytes:
    options = [dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)] if cookie else []
    q = dns.message.make_query(
        name, rtype, use_edns=0 if edns else False, want_dnssec=do, payload=payload, options=options
    )
    q.id = qid
    if cd:
        q.flags |= dns.flags.CD
    if not rd:
        q.flags &= ~dns.flags.RD
    return q.to_wire()


def careful(r: Resolver, data: bytes) -> bytes:
    got = asyncio.run(r.resolve(data, tcp=False, client=CLIENT))
    assert got is not None
    return got


def test_hot_answer_is_the_careful_answer_byte_for_byte() -> None:
    r, fwd, clock, _ = resolver()
    names = ["www.example.org", "WwW.ExAmPlE.oRg", "nx.example.org"]
    variants = list(itertools.product((False, True), (False, True), (False, True)))
    for name, rtype in itertools.product(names, ["A", "AAAA", "TYPE65"]):
        for edns, do, cd in variants:
            careful(r, query(name, rtype, 1, edns, do and edns, cd))  # fills the cache
    asked = len(fwd.asked)
    qid = 100
    for step in (0.0, 0.4, 1.7, 30.2, 70.9):  # TTLs count down (negative TTL: 120 s)
        clock.now += step
        for name, rtype in itertools.product(names, ["A", "AAAA", "TYPE65"]):
            for (edns, do, cd), rd in itertools.product(variants, (True, False)):
                qid += 1
                data = query(name, rtype, qid, edns, do and edns, cd, rd, cookie=edns and cd)
                hot = r.fast(data, CLIENT)
                assert hot is not None, (name, rtype, edns, do, cd, rd)
                assert hot == careful(r, data), (name, rtype, edns, do, cd, rd, step)
    assert len(fwd.asked) == asked  # every answer came from the cache
    cached = sum(n for k, n in r.stats.totals().items() if k[3] == "cache")
    assert cached >= 2 * 5 * 9 * 16  # both paths are counted as cache answers
    assert ("udp", "A", "NXDOMAIN", "cache") in r.stats.totals()


def test_hot_path_counts_hits_once_and_leaves_misses_to_the_careful_path() -> None:
    r, _, _, _ = resolver()
    cache = r.cache
    assert cache is not None
    data = query("www.example.org", "A", 7)
    assert r.fast(data, CLIENT) is None  # a miss: nothing counted here
    assert cache.stats.misses == 0 and cache.stats.hits == 0
    careful(r, data)
    assert cache.stats.misses == 1
    assert r.fast(data, CLIENT) is not None
    assert cache.stats.hits == 1


def test_expiry_and_prefetch_go_to_the_careful_path() -> None:
    r, fwd, clock, _ = resolver()
    data = query("www.example.org", "A", 7)
    careful(r, data)
    for _ in range(3):
        assert r.fast(data, CLIENT) is not None
    clock.now += 275  # the last 10% of a 300 s life, with hits: due for prefetch
    assert r.fast(data, CLIENT) is None
    n = len(fwd.asked)
    careful(r, data)  # serves the entry and starts the refresh
    assert len(fwd.asked) == n + 1
    clock.now += 100
    assert r.fast(data, CLIENT) is not None  # the refreshed entry, stored 100 s ago
    clock.now += 201
    assert r.fast(data, CLIENT) is None  # expired


def test_a_new_mesh_host_beats_a_cached_forwarded_answer() -> None:
    r, _, _, m = resolver()
    data = query("svc.mesh.test", "A", 7)
    careful(r, data)
    assert r.fast(data, CLIENT) is not None
    m.upsert(se("wild", ["*.mesh.test"], "2024-01-01T00:00:00Z", addresses=["240.240.0.9"]))
    assert r.fast(data, CLIENT) is None  # the mesh changed: the careful path looks again
    got = dns.message.from_wire(careful(r, data))
    assert [rr.to_text() for rr in got.answer[0]] == ["240.240.0.9"]
    assert r.fast(data, CLIENT) is None  # still the wildcard's, never the cached answer
    m.delete(("ServiceEntry", "ns1", "wild"))
    careful(r, data)  # forwarded again: the cache holds it, checked at this generation
    assert r.fast(data, CLIENT) is not None


def test_what_the_hot_path_leaves_alone() -> None:
    r, _, _, _ = resolver()
    big = query("big.example.org", "TXT", 7)
    careful(r, query("big.example.org", "TXT", 7, edns=True))
    careful(r, big)
    assert r.fast(query("big.example.org", "TXT", 8, edns=True), CLIENT) is not None
    assert r.fast(big, CLIENT) is None  # needs truncating to 512: the careful path fits it
    www = query("www.example.org", "A", 9)
    careful(r, www)
    assert r.fast(www, CLIENT) is not None
    axfr = dns.message.make_query("www.example.org", "AXFR").to_wire()
    chaos = dns.message.make_query("www.example.org", "A", rdclass="CH").to_wire()
    v1 = query("www.example.org", "A", 9, edns=True)
    v1 = v1[:-5] + b"\x01" + v1[-4:]  # EDNS version 1: BADVERS is the careful path's
    response = bytes([www[0], www[1], www[2] | 0x80]) + www[3:]
    for data in (axfr, chaos, v1, response, www + b"\x00", www[:-1]):
        assert r.fast(data, CLIENT) is None
    assert r.fast(www, None) is None  # no client: no route


def test_routes_stay_apart_and_stub_zones_take_the_careful_path() -> None:
    flows = {CLIENT: "192.0.2.53", ("10.0.0.8", 1): "198.51.100.1"}
    s = Settings(upstream=UpstreamSettings(zones=(("example.org", (Endpoint("192.0.2.99", 53),)),)))
    r, fwd, _, _ = resolver(asked=flows)
    data = query("svc.mesh.test", "A", 7)
    careful(r, data)
    assert r.fast(data, CLIENT) is not None
    assert r.fast(data, ("10.0.0.8", 1)) is None  # asked a server nobody allowed
    assert r.fast(data, ("10.0.0.9", 2)) is not None  # no flow: the captured servers
    rz, _, _, _ = resolver(s)
    www = query("www.example.org", "A", 7)
    careful(rz, www)
    assert rz.fast(www, CLIENT) is None  # a --forward zone: the careful path routes it
    assert len(fwd.asked) == 1


def test_the_memo_serves_repeats_until_a_ttl_ticks_and_never_past_the_cache() -> None:
    r, _, clock, m = resolver()
    cache = r.cache
    assert cache is not None
    clock.now += 0.25  # between whole seconds, as real time always is
    data = query("www.example.org", "A", 1)
    careful(r, data)
    looked: list[bytes] = []
    real_hot = cache.hot

    def counting_hot(key: bytes, generation: int) -> Any:
        looked.append(key)
        return real_hot(key, generation)

    cache.hot = counting_hot  # type: ignore[method-assign]
    clock.now += 0.1
    first = r.fast(query("www.example.org", "A", 2), CLIENT)
    for qid in range(3, 50):
        clock.now += 0.01
        again = r.fast(query("www.example.org", "A", qid), CLIENT)
        assert again is not None and first is not None and again[2:] == first[2:]
        assert again[:2] == qid.to_bytes(2, "big")
        assert again == careful(r, query("www.example.org", "A", qid))
    assert len(looked) == 1  # the rest came from the memo
    hits = cache.stats.hits
    r.fast(query("www.example.org", "A", 50), CLIENT)
    assert cache.stats.hits == hits + 1  # memo answers are cache hits all the same
    clock.now += 0.5  # the entry's age ticks over: TTLs change, the memo must not serve
    ticked = r.fast(query("www.example.org", "A", 51), CLIENT)
    assert ticked is not None and first is not None and ticked[2:] != first[2:]
    assert ticked == careful(r, query("www.example.org", "A", 51))
    assert len(looked) == 2
    m.upsert(se("other", ["other.mesh.test"], "2024-01-01T00:00:00Z", addresses=["240.240.0.8"]))
    assert r.fast(query("www.example.org", "A", 52), CLIENT) is None  # the mesh changed
    careful(r, data)
    assert r.fast(query("www.example.org", "A", 53), CLIENT) is not None
    cache.entries.clear()  # evicted: still a correct answer until its TTLs tick over ...
    assert r.fast(query("www.example.org", "A", 54), CLIENT) is not None
    clock.now += 1.0  # ... and then nothing serves it
    assert r.fast(query("www.example.org", "A", 55), CLIENT) is None


def test_remembered_table_answers_follow_the_map() -> None:
    r, _, _, m = resolver()
    m.upsert(svc("web", ip="10.96.0.5"))
    name = "web.ns1.svc.cluster.local"
    first = r.fast(query(name, "A", 1), CLIENT)
    again = r.fast(query(name, "A", 2), CLIENT)
    assert first is not None and again is not None and again[2:] == first[2:]
    assert [rr.to_text() for rr in dns.message.from_wire(again).answer[0]] == ["10.96.0.5"]
    m.upsert(svc("web", ip="10.96.0.6"))
    moved = r.fast(query(name, "A", 3), CLIENT)
    assert moved is not None
    assert [rr.to_text() for rr in dns.message.from_wire(moved).answer[0]] == ["10.96.0.6"]
    m.delete(("Service", "ns1", "web"))
    assert r.fast(query(name, "A", 4), CLIENT) is None  # the careful path: NXDOMAIN
    totals = r.stats.totals()
    assert totals[("udp", "A", "NOERROR", "authoritative")] == 3  # remembered ones count too


def test_search_path_junk_is_remembered_without_autopath_only() -> None:
    r, fwd, _, m = resolver(Settings(autopath=AutopathSettings(enabled=False)))
    junk = "www.ns1.svc.cluster.local"  # as "www" in namespace ns1's search expansion
    first = careful(r, query(junk, "A", 1))
    assert dns.message.from_wire(first).rcode() == dns.rcode.NXDOMAIN
    again = r.fast(query(junk, "A", 2), CLIENT)
    assert again is not None and again[:2] == b"\x00\x02" and again[2:] == first[2:]
    assert ("udp", "A", "NXDOMAIN", "authoritative") in r.stats.totals()
    m.upsert(svc("www", ip="10.96.0.7"))  # the name exists now
    now = r.fast(query(junk, "A", 3), CLIENT)
    assert now is not None and dns.message.from_wire(now).rcode() == dns.rcode.NOERROR
    assert fwd.asked == []
    ra, _, _, _ = resolver()  # autopath is on by default
    careful(ra, query(junk, "A", 1))
    assert ra.fast(query(junk, "A", 2), CLIENT) is None  # autopath: the client's namespace

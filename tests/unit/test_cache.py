"""The answer cache with a fake clock: TTL countdown, RFC 2308 negative TTLs, clamps, LRU
bounds, serve-stale, prefetch."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset

from interceptor.resolve.cache import STALE_TTL, Cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reply(
    name: str = "www.example.com",
    ttl: int = 300,
    rcode: int = 0,
    soa: tuple[int, int] | None = None,
) -> bytes:
    q = dns.message.make_query(name, "A")
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == 0 and soa is None:
        r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", "192.0.2.1"))
        r.answer.append(dns.rrset.from_text(name + ".", ttl + 100, "IN", "TXT", '"x"'))
    if soa is not None:
        soa_ttl, minimum = soa
        r.authority.append(
            dns.rrset.from_text(
                "example.com.", soa_ttl, "IN", "SOA", f"ns. host. 1 2 3 4 {minimum}"
            )
        )
    return r.to_wire()


def ttls(wire: bytes) -> list[int]:
    m = dns.message.from_wire(wire)
    return [rr.ttl for rr in m.answer + m.authority]


def test_ttls_count_down_and_entry_expires() -> None:
    clock = Clock()
    c = Cache(clock=clock)
    c.put(b"k", reply(ttl=300))
    clock.now += 100
    got = c.get(b"k")
    assert got is not None and ttls(got[0]) == [200, 200]  # capped by the entry's life
    clock.now += 201
    assert c.get(b"k") is None
    assert c.stats.hits == 1 and c.stats.misses == 1


def test_negative_ttl_is_soa_min_of_ttl_and_minimum() -> None:
    clock = Clock()
    c = Cache(clock=clock)
    c.put(b"nx", reply(rcode=dns.rcode.NXDOMAIN, soa=(900, 60)))
    clock.now += 59
    assert c.get(b"nx") is not None
    clock.now += 2
    assert c.get(b"nx") is None


def test_clamps_and_uncacheable() -> None:
    clock = Clock()
    c = Cache(clock=clock, min_ttl=50, max_ttl=100)
    c.put(b"short", reply(ttl=5))
    c.put(b"long", reply(ttl=10000))
    c.put(b"fail", reply(rcode=dns.rcode.SERVFAIL, soa=None))
    clock.now += 49
    assert c.get(b"short") is not None and c.get(b"fail") is None
    clock.now += 52
    assert c.get(b"long") is None


def test_lru_bound_by_entries() -> None:
    c = Cache(max_entries=2, clock=Clock())
    c.put(b"a", reply("a.example"))
    c.put(b"b", reply("b.example"))
    assert c.get(b"a") is not None  # a is now the most recent
    c.put(b"c", reply("c.example"))
    assert c.get(b"b") is None and c.get(b"a") is not None and c.stats.evictions == 1


def test_stale_only_when_asked_and_within_window() -> None:
    clock = Clock()
    c = Cache(clock=clock, stale_for=600)
    c.put(b"k", reply(ttl=60))
    clock.now += 120
    assert c.get(b"k") is None
    stale = c.get(b"k", stale=True)
    assert stale is not None and set(ttls(stale[0])) == {STALE_TTL}
    clock.now += 600
    assert c.get(b"k", stale=True) is None


def test_prefetch_for_popular_entries_near_expiry() -> None:
    clock = Clock()
    c = Cache(clock=clock)
    c.put(b"k", reply(ttl=100))
    got = c.get(b"k")
    assert got is not None and not c.claim_prefetch(got[1])
    clock.now += 95
    got = c.get(b"k")
    assert got is not None and c.claim_prefetch(got[1])
    assert c.stats.prefetches == 1
    assert not c.claim_prefetch(got[1])  # claimed: one refresh at a time

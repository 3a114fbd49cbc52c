from __future__ import annotations

import ipaddress
import random

from interceptor.model.vip import V4_NET, Claim, allocate


def claims(n: int, prefix: str = "h") -> list[Claim]:
    return [
        Claim(f"2024-01-01T00:00:{i % 60:02d}Z", "ns", f"se{i}", f"{prefix}{i}.example.com")
        for i in range(n)
    ]


def test_pure_function_of_the_set() -> None:
    cs = claims(500)
    expected = allocate(cs)
    for seed in range(5):
        shuffled = cs[:]
        random.Random(seed).shuffle(shuffled)
        assert allocate(shuffled) == expected


def test_in_range_unique_and_not_network_or_broadcast() -> None:
    got = allocate(claims(2000))
    assert len(set(got.values())) == 2000
    for vip in got.values():
        ip = ipaddress.ip_address(vip)
        assert ip in V4_NET and ip not in (V4_NET.network_address, V4_NET.broadcast_address)


def test_existing_hosts_keep_their_vip_when_others_come_and_go() -> None:
    old = claims(300)
    before = allocate(old)
    newer = [
        Claim("2025-01-01T00:00:00Z", "ns", f"late{i}", f"late{i}.example.org") for i in range(300)
    ]
    after = allocate(old + newer)
    assert {h: after[h] for h in before} == before
    assert allocate(old) == before  # and again once the newcomers are gone


def test_collisions_resolved_deterministically_oldest_wins() -> None:
    net = ipaddress.IPv4Network("240.240.0.0/29")  # 6 usable: collisions guaranteed
    cs = claims(6)
    got = allocate(cs, net)
    assert len(set(got.values())) == 6
    assert allocate(list(reversed(cs)), net) == got
    first = allocate(cs[:1], net)
    assert got[cs[0].host] == first[cs[0].host]


def test_same_host_in_two_entries_gets_one_vip() -> None:
    a = Claim("2024-01-02T00:00:00Z", "b", "se", "dup.example.com")
    b = Claim("2024-01-01T00:00:00Z", "a", "se", "dup.example.com")
    assert allocate([a, b]) == allocate([b]) == allocate([b, a])

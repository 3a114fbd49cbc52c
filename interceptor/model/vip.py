"""Mesh virtual IPs for ServiceEntry hosts, the way Istio's DNS proxy hands them out.

The allocation must come out the same on every node and after every restart with no
coordination, so it is a pure function of the *set* of ServiceEntries, never of the order in
which events arrived:

* each host has its own probe sequence of candidate addresses, ``H(host, 0), H(host, 1), ...``
  (SHA-256, so it is identical in every process and every Python version);
* hosts claim addresses in priority order: the oldest ServiceEntry first
  (``creationTimestamp``), then namespace/name/host as tie-breakers;
* each takes the first free address of its sequence.

A new entry therefore never moves an existing host: it sorts after the hosts already there
and only probes around them.  Only a host that had collided with a removed one may move back
to an earlier candidate.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

V4_NET = ipaddress.IPv4Network("240.240.0.0/16")
V6_NET = ipaddress.IPv6Network("2001:2::/48")


@dataclass(frozen=True, order=True, slots=True)
class Claim:
    """A host asking for a VIP, with the priority it claims at."""

    created: str
    namespace: str
    name: str
    host: str


def _candidates(
    host: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network, tries: int
) -> Iterable[str]:
    # Skip the network's first and last address (240.240.0.0, 240.240.255.255), which some
    # stacks treat as network/broadcast addresses.
    usable = net.num_addresses - 2
    base = int(net.network_address)
    for i in range(tries):
        digest = hashlib.sha256(f"{host}\x00{i}".encode()).digest()
        offset = int.from_bytes(digest[:16], "big") % usable + 1
        yield ipaddress.ip_address(base + offset).compressed


def allocate(
    claims: Iterable[Claim], net: ipaddress.IPv4Network | ipaddress.IPv6Network = V4_NET
) -> dict[str, str]:
    """host -> VIP for every distinct host of ``claims``.  Pure and order-independent."""
    best: dict[str, Claim] = {}
    for c in claims:
        if c.host not in best or c < best[c.host]:
            best[c.host] = c
    taken: set[str] = set()
    result: dict[str, str] = {}
    usable = net.num_addresses - 2
    if len(best) > usable:
        raise ValueError(f"{len(best)} mesh hosts do not fit in {net}")
    for claim in sorted(best.values()):
        for vip in _candidates(claim.host, net, tries=64):
            if vip not in taken:
                break
        else:
            # 64 collisions in a row: the range is nearly full.  Fall back to a linear scan
            # from the first candidate, still deterministic.
            vip = _linear_free(claim.host, net, taken)
        taken.add(vip)
        result[claim.host] = vip
    return result


def _linear_free(
    host: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network, taken: set[str]
) -> str:
    first = next(iter(_candidates(host, net, 1)))
    base = int(net.network_address)
    usable = net.num_addresses - 2
    start = int(ipaddress.ip_address(first)) - base - 1
    for step in range(usable):
        vip = ipaddress.ip_address(base + 1 + (start + step) % usable).compressed
        if vip not in taken:
            return vip
    raise ValueError(f"no free address left in {net}")

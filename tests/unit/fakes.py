"""In-process stand-ins for the resolver's collaborators (fault injection and speed for the
unit tier; the process and lab tiers use real servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from interceptor.resolve.upstream import UpstreamFailed
from interceptor.settings import Endpoint
from interceptor.telemetry.stats import UpstreamStats


class FakeForwarder:
    """Answers from ``records`` (name -> type -> rdata texts) like an authoritative server
    for example.org and corp.test: NXDOMAIN for unknown names, NODATA with an SOA for known
    names without the type.  ``failing`` names raise UpstreamFailed (SERVFAIL); ``slow``
    names answer after that many seconds; ``rcodes`` names answer with that RCODE."""

    def __init__(
        self, records: dict[str, dict[str, list[str]]], failing: frozenset[str] = frozenset()
    ) -> None:
        self.stats = UpstreamStats()
        self.records = records
        self.failing = failing
        self.asked: list[tuple[str, str]] = []
        self.slow: dict[str, float] = {}
        self.rcodes: dict[str, int] = {}

    async def forward(self, query: bytes, servers: Sequence[Endpoint]) -> bytes:
        q = dns.message.from_wire(query)
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(q.question[0].rdtype)
        self.asked.append((name, rtype))
        if name in self.slow:
            await asyncio.sleep(self.slow[name])
        if name in self.failing:
            raise UpstreamFailed("blackholed")
        r = dns.message.make_response(q)
        if name in self.rcodes:
            r.set_rcode(self.rcodes[name])
            return r.to_wire()
        types = self.records.get(name)
        if types is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        if types and rtype in types:
            r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", rtype, *types[rtype]))
        else:
            soa = "ns.example.org. host.example.org. 1 7200 900 1209600 120"
            r.authority.append(dns.rrset.from_text("example.org.", 600, "IN", "SOA", soa))
        return r.to_wire()

    def healthy(self) -> dict[str, bool]:
        return {}

    def close(self) -> None:
        pass

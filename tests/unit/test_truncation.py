"""RFC 2181 section 9 in every path: additional records go before TC is set, TC only when
the answer section itself does not fit, and then as many whole answer records as fit (a
stub that never retries over TCP still gets addresses)."""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from interceptor.dns.message import fit, opt_record
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.cache import Cache
from interceptor.resolve.resolver import Resolver
from interceptor.settings import Endpoint, Settings, ZoneSettings
from interceptor.sources.yamlfile import load_text
from tests.unit.fakes import FakeForwarder

ENDPOINTS = 40
HEADLESS = f"""
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: big, namespace: ns1}}
  spec: {{clusterIP: None, ports: [{{name: http, port: 80, protocol: TCP}}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: big-a, namespace: ns1, labels: {{kubernetes.io/service-name: big}}}}
  addressType: IPv4
  ports: [{{name: http, port: 80, protocol: TCP}}]
  endpoints:
{chr(10).join(f"  - {{addresses: [10.1.0.{i + 1}], hostname: pet-{i}}}" for i in range(ENDPOINTS))}
"""


def resolver(cache: bool = False) -> tuple[Resolver, FakeForwarder]:
    m = ServiceMap(ZoneSettings())
    m.replace(load_text(HEADLESS, "test").objects)
    fwd = FakeForwarder({})
    s = Settings()
    c = Cache() if cache else None
    return Resolver(m, fwd, s, [Endpoint("192.0.2.53", 53)], cache=c), fwd


def ask(
    r: Resolver, name: str, rtype: str, edns: int | None = None
) -> tuple[bytes, dns.message.Message]:
    q = dns.message.make_query(name, rtype, use_edns=edns is not None, payload=edns or 512)
    wire = asyncio.run(r.resolve(q.to_wire(), tcp=False, client=None))
    assert wire is not None
    return wire, dns.message.from_wire(wire)  # strict: every cut message must parse


@pytest.mark.parametrize("edns", [None, 1232])
def test_a_headless_service_too_big_for_udp_gives_whole_records_and_tc(edns: int | None) -> None:
    r, _ = resolver()
    name = "big.ns1.svc.cluster.local"
    wire, m = ask(r, name, "A", edns)
    got = len(m.answer[0]) if m.answer else 0
    if edns is not None:  # 40 addresses fit in 1232 bytes: nothing cut
        assert got == ENDPOINTS and not m.flags & dns.flags.TC
        return
    # Header, question, then 16 bytes per A record (a pointer for the owner name): as many
    # whole records as 512 bytes hold, and TC.  CoreDNS answers the same way.
    room = 512 - 12 - (len(name) + 2 + 4)
    assert len(wire) <= 512 and m.flags & dns.flags.TC
    assert got == room // 16 and 0 < got < ENDPOINTS


def test_srv_drops_additional_records_before_setting_tc() -> None:
    r, _ = resolver()
    q = dns.message.make_query("_http._tcp.big.ns1.svc.cluster.local", "SRV", use_edns=0)
    full = asyncio.run(r.resolve(q.to_wire(), tcp=True, client=None))  # TCP: no limit
    assert full is not None
    whole = dns.message.from_wire(full)
    assert whole.additional and not whole.flags & dns.flags.TC
    # A limit between "answer only" and "answer plus additional": no TC, no additional.
    bare = dns.message.from_wire(full)
    bare.additional = []  # dnspython keeps the OPT record apart: it stays
    limit = len(bare.to_wire()) + 20
    cut = fit(full, limit, opt_record(1232, False))
    m = dns.message.from_wire(cut)
    assert len(cut) <= limit
    assert not m.flags & dns.flags.TC
    assert len(m.answer[0]) == ENDPOINTS and not [a for a in m.additional if a.rdtype == 1]


def test_a_forwarded_reply_is_cut_the_same_way() -> None:
    r, fwd = resolver(cache=True)
    fwd.records = {"many.example.org": {"A": [f"192.0.2.{i}" for i in range(1, 61)]}}
    wire, m = ask(r, "many.example.org", "A")
    assert len(wire) <= 512 and m.flags & dns.flags.TC
    assert 0 < len(m.answer[0]) < 60
    # The cached copy is whole: over TCP (no limit) the client gets all of it.
    q = dns.message.make_query("many.example.org", "A")
    full = asyncio.run(r.resolve(q.to_wire(), tcp=True, client=None))
    assert full is not None and len(dns.message.from_wire(full).answer[0]) == 60


def test_a_negative_answer_keeps_its_soa_when_it_fits() -> None:
    r, _ = resolver()
    _, m = ask(r, "nope.ns1.svc.cluster.local", "A")
    assert m.rcode() == 3 and m.authority and not m.flags & dns.flags.TC


def test_a_message_that_cannot_be_walked_is_cut_to_its_header() -> None:
    q = dns.message.make_response(dns.message.make_query("x.example", "A"))
    q.answer.append(dns.rrset.from_text("x.example.", 60, "IN", "A", "192.0.2.1"))
    wire = bytearray(q.to_wire())
    wire[7] = 9  # claims nine answers, holds one
    m = dns.message.from_wire(fit(bytes(wire), 40, b""))
    assert m.flags & dns.flags.TC and not m.answer

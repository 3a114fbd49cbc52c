"""The hot path must give byte-for-byte what the careful path gives, and decline the rest."""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from interceptor.dns import wire
from interceptor.dns.message import Malformed, fast_response, parse_query
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.resolver import Resolver
from interceptor.resolve.upstream import Forwarder
from interceptor.settings import Endpoint, Settings, ZoneSettings
from interceptor.sources.yamlfile import load_file
from tests.helpers import DATA


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    m = ServiceMap(ZoneSettings())
    m.replace(load_file(DATA / "cluster.yaml").objects)
    s = Settings()
    return Resolver(m, Forwarder(s.upstream), s, [Endpoint("127.0.0.1", 9)])


NAMES = [
    "svc1.ns1.svc.cluster.local",
    "SVC1.ns1.Svc.cluster.local",
    "dual.ns1.svc.cluster.local",
    "hdls.ns1.svc.cluster.local",
    "_http._tcp.hdls.ns1.svc.cluster.local",
    "auto.mesh.test",
    "big.ns1.svc.cluster.local",
    "1.1.96.10.in-addr.arpa",
]
TYPES = ["A", "AAAA", "SRV", "PTR", "ANY", "TXT"]


def queries() -> list[bytes]:
    out = []
    for name in NAMES:
        for t in TYPES:
            for edns in (-1, 0):
                for payload in (512, 1232, 4096):
                    q = dns.message.make_query(name, t, use_edns=edns, payload=payload)
                    q.flags &= ~0x0100 if payload == 4096 else 0xFFFF  # RD off in some
                    out.append(q.to_wire())
    return out


def test_fast_equals_careful(resolver: Resolver) -> None:
    """Every query the fast path answers, it answers byte for byte as the careful path does;
    and it does answer many of them (an equivalence over an empty set proves nothing)."""
    eligible = 0
    for data in queries():
        fast = fast_response(data, resolver.smap.answers, 1232)
        if fast is None:
            continue
        eligible += 1
        assert fast == asyncio.run(resolver.resolve(data, tcp=False)), data
        dns.message.from_wire(fast)  # and it parses
    assert eligible >= 50, f"only {eligible} of {len(queries())} queries took the fast path"


def test_fast_path_serves_hits(resolver: Resolver) -> None:
    q = dns.message.make_query("svc1.ns1.svc.cluster.local", "A").to_wire()
    assert fast_response(q, resolver.smap.answers, 1232) is not None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:2] + b"\x81\x00" + b[4:],  # a response (QR=1)
        lambda b: b[:2] + b"\x28\x00" + b[4:],  # opcode UPDATE
        lambda b: b[:-2] + b"\x00\x03",  # class CH
        lambda b: b + b"\x00",  # trailing byte
        lambda b: b[:5] + b"\x02" + b[6:],  # qdcount 2
    ],
)
def test_fast_path_declines_unusual(resolver: Resolver, mutate: object) -> None:
    q = dns.message.make_query("svc1.ns1.svc.cluster.local", "A", use_edns=False).to_wire()
    assert fast_response(mutate(q), resolver.smap.answers, 1232) is None  # type: ignore[operator]


def test_parse_query_errors() -> None:
    with pytest.raises(Malformed) as e:
        parse_query(b"\x00\x01")
    assert e.value.rcode is None
    q = dns.message.make_query("a.example", "A", use_edns=0)
    q.use_edns(0)
    data = q.to_wire()
    twice = data[:11] + b"\x02" + data[12:] + data[-11:]
    with pytest.raises(Malformed) as e:
        parse_query(twice)
    assert e.value.rcode == dns.rcode.FORMERR


def test_a_question_name_of_256_octets_is_formerr_and_not_echoed(resolver: Resolver) -> None:
    """255 octets is the limit counting the root label's zero (RFC 1035 3.1): a name one
    octet longer must not be echoed back in a reply no parser accepts (found by the fuzz)."""
    label = b"x" * 63

    def query(labels: list[bytes]) -> bytes:
        name = b"".join(bytes([len(lb)]) + lb for lb in labels) + b"\0"
        return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"

    fits = [label, label, label, b"x" * 61]  # 4 * 64 - 2 + 1 = 255 octets
    assert parse_query(query(fits)).qname.count(".") == 3
    with pytest.raises(Malformed) as e:
        parse_query(query([label, label, label, b"x" * 62]))  # 256 octets
    assert e.value.rcode == dns.rcode.FORMERR
    reply = asyncio.run(resolver.resolve(query([label, label, label, b"x" * 62]), tcp=False))
    assert reply is not None
    parsed = dns.message.from_wire(reply)  # strict: would raise NameTooLong if echoed
    assert parsed.rcode() == dns.rcode.FORMERR


def test_cap_edns_payload_sent_upstream() -> None:
    from interceptor.dns.message import cap_edns

    big = parse_query(dns.message.make_query("a.example", "A", use_edns=0, payload=4096).to_wire())
    capped = dns.message.from_wire(cap_edns(big, 1232))
    assert capped.payload == 1232 and capped.id == big.id
    small = parse_query(dns.message.make_query("a.example", "A", use_edns=0, payload=800).to_wire())
    assert cap_edns(small, 1232) == small.data


def test_cap_edns_sends_no_client_options_upstream() -> None:
    """EDNS options are hop-by-hop: a client's COOKIE must not reach the upstream, or its
    echo would be cached and served to other clients (dig: "Client COOKIE mismatch")."""
    import dns.edns

    from interceptor.dns.message import cap_edns

    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8)))
    q = dns.message.make_query("a.example", "A", use_edns=0, payload=1232, options=[cookie])
    q.flags |= dns.flags.RD
    q.want_dnssec(True)
    sent = dns.message.from_wire(cap_edns(parse_query(q.to_wire()), 1232))
    assert not sent.options and sent.edns == 0 and sent.payload == 1232
    assert sent.ednsflags & dns.flags.DO and sent.flags & dns.flags.RD
    assert sent.question == q.question and sent.id == q.id


def test_any_is_made_when_asked_with_every_record_of_the_name(resolver: Resolver) -> None:
    """ANY answers are not kept in the table (memory); made on demand they carry every
    record of the name, as the table's answers for each type do."""
    smap = resolver.smap
    name = "svc1.ns1.svc.cluster.local"
    assert wire.encode_name(name) + b"\x00\xff" not in smap.answers

    def ask(qname: str, qtype: str) -> dns.message.Message:
        q = dns.message.make_query(qname, qtype, use_edns=0, payload=4096).to_wire()
        reply = asyncio.run(resolver.resolve(q, tcp=True))
        assert reply is not None
        return dns.message.from_wire(reply)

    every = ask(name, "ANY")
    by_type = {rrset.rdtype: sorted(r.to_text() for r in rrset) for rrset in every.answer}
    assert set(by_type) == {dns.rdatatype.A, dns.rdatatype.SRV}
    for rdtype, texts in by_type.items():
        one = ask(name, dns.rdatatype.to_text(rdtype))
        assert sorted(r.to_text() for rrset in one.answer for r in rrset) == texts
    assert every.flags & dns.flags.AA
    # An empty non-terminal has no records of its own: NODATA, as before.
    ent = ask("_tcp.svc1.ns1.svc.cluster.local", "ANY")
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer

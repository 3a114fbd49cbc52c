"""Autopath: search lists as kubelet writes them, and the resolver's answer to a first
search expansion, section by section, against an in-process fake upstream that records
every question it gets."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import replace

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from interceptor.model.objects import Pod, parse
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.autopath import ClientIndex, expansion, search_list
from interceptor.resolve.cache import Cache
from interceptor.resolve.resolver import Resolver
from interceptor.settings import AutopathSettings, Endpoint, Settings, ZoneSettings
from interceptor.sources.yamlfile import load_file
from tests.helpers import DATA
from tests.unit.fakes import FakeForwarder

ZONE = "cluster.local"
POD_IP = "10.244.0.5"  # ns1/client in tests/data/cluster.yaml
UPSTREAM = (Endpoint("192.0.2.53", 53),)


RECORDS = {
    "www.example.org": {"A": ["192.0.2.80"], "AAAA": ["2001:db8::80"]},
    "v4only.example.org": {"A": ["192.0.2.81"]},
    "db.corp.test": {"A": ["192.0.2.90"]},
    "db": {"AAAA": ["2001:db8::90"]},
    "mixed.corp.test": {"A": ["192.0.2.91"]},
    "mixed": {"AAAA": ["2001:db8::91"]},
}


def make(
    node_search: tuple[str, ...] = (),
    enabled: bool = True,
    failing: frozenset[str] = frozenset(),
    extra: Sequence[dict[str, object]] = (),
) -> tuple[Resolver, FakeForwarder]:
    smap = ServiceMap(ZoneSettings())
    smap.replace(load_file(DATA / "cluster.yaml").objects)
    for obj in extra:
        smap.upsert(parse(obj))
    settings = replace(Settings(), autopath=AutopathSettings(enabled, node_search))
    fwd = FakeForwarder(RECORDS, failing)
    return Resolver(smap, fwd, settings, UPSTREAM, cache=Cache()), fwd


def ask(
    resolver: Resolver, name: str, rtype: str = "A", client: str | None = POD_IP, **kw: object
) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
    q.id = 0x4242
    peer = (client, 40000) if client else None
    wire = asyncio.run(resolver.resolve(q.to_wire(), tcp=False, client=peer))
    assert wire is not None
    assert wire[:2] == b"\x42\x42"
    return dns.message.from_wire(wire)


def rrs(section: list[dns.rrset.RRset]) -> list[tuple[str, str, int, str]]:
    return [
        (r.name.to_text(), dns.rdatatype.to_text(r.rdtype), r.ttl, rd.to_text())
        for r in section
        for rd in r
    ]


# --------------------------------------------------------------- search lists


def pod(**kw: object) -> Pod:
    base: dict[str, object] = {
        "namespace": "ns1",
        "name": "p",
        "ips": ("10.0.0.1",),
        "node_name": "n",
        "host_network": False,
    }
    return Pod(**{**base, **kw})  # type: ignore[arg-type]


def test_search_list_follows_kubelet() -> None:
    node = ("corp.test", "svc.cluster.local")  # a duplicate of a cluster entry is dropped
    assert search_list(pod(), ZONE, node) == (
        "ns1.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        "corp.test",
    )
    custom = pod(dns_searches=("extra.test",))
    assert search_list(custom, ZONE, ())[-1] == "extra.test"  # type: ignore[index]
    none = pod(dns_policy="None", dns_searches=("a.test", "b.test"))
    assert search_list(none, ZONE, node) == ("a.test", "b.test")
    assert search_list(pod(host_network=True), ZONE, ()) is None
    assert search_list(pod(dns_policy="Weird"), ZONE, ()) is None
    many = pod(dns_searches=tuple(f"d{i}.test" for i in range(40)))
    assert len(search_list(many, ZONE, ()) or ()) == 32


def test_pod_dns_fields_are_parsed() -> None:
    obj = parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns1"},
            "spec": {"dnsPolicy": "None", "dnsConfig": {"searches": ["A.test.", "b.test"]}},
            "status": {"podIP": "10.0.0.1"},
        }
    )
    assert isinstance(obj, Pod)
    assert (obj.dns_policy, obj.dns_searches) == ("None", ("a.test", "b.test"))


def test_expansion_only_for_the_first_domain_inside_the_zone() -> None:
    search = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert expansion("www.example.org.ns1.svc.cluster.local", search, ZONE) == "www.example.org"
    assert expansion("x.svc.cluster.local", search, ZONE) is None  # a later expansion
    assert expansion("ns1.svc.cluster.local", search, ZONE) is None  # no base name
    assert expansion("x.corp.test", ("corp.test",), ZONE) is None  # not our zone


def test_client_index_skips_host_network_and_ambiguous_ips() -> None:
    smap = ServiceMap(ZoneSettings())
    for name, ns, ip, host in (
        ("a", "ns1", "10.0.0.1", False),
        ("b", "ns2", "10.0.0.2", False),
        ("c", "ns3", "10.0.0.2", False),  # an IP two namespaces claim
        ("h", "ns1", "192.168.0.1", True),
    ):
        smap.upsert(
            parse(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"hostNetwork": host},
                    "status": {"podIP": ip},
                }
            )
        )
    index = ClientIndex(smap, ())
    assert (index.search("10.0.0.1") or ())[0] == "ns1.svc.cluster.local"
    assert index.search("10.0.0.2") is None
    assert index.search("192.168.0.1") is None
    assert index.search("10.9.9.9") is None


# ------------------------------------------------------------ resolver answers


def test_external_name_is_one_round_trip() -> None:
    resolver, fwd = make()
    m = ask(resolver, "www.example.org.ns1.svc.cluster.local")
    assert m.rcode() == dns.rcode.NOERROR
    assert m.question[0].name.to_text() == "www.example.org.ns1.svc.cluster.local."
    assert rrs(m.answer) == [
        ("www.example.org.ns1.svc.cluster.local.", "CNAME", 30, "www.example.org."),
        ("www.example.org.", "A", 300, "192.0.2.80"),
    ]
    assert not m.flags & dns.flags.AA  # the records are the upstream's, not ours
    # The cluster candidates came from the map: only the bare name went upstream.
    assert fwd.asked == [("www.example.org", "A")]
    assert resolver.stats.autopath == {"hit": 1, "miss": 0}
    ask(resolver, "www.example.org.ns1.svc.cluster.local")
    assert fwd.asked == [("www.example.org", "A")]  # the candidate came from the cache


def test_wire_layout_cname_points_at_the_question() -> None:
    resolver, _ = make()
    q = dns.message.make_query("www.example.org.ns1.svc.cluster.local", "A")
    wire = asyncio.run(resolver.resolve(q.to_wire(), tcp=False, client=(POD_IP, 1)))
    assert wire is not None
    qend = 12 + len(q.question[0].name.to_wire()) + 4
    assert struct.unpack("!HHHH", wire[4:12]) == (1, 2, 0, 0)
    # The CNAME's owner is a pointer to the question: the client's own bytes.
    assert wire[qend : qend + 4] == b"\xc0\x0c\x00\x05"
    target = dns.name.from_text("www.example.org").to_wire()
    assert wire[qend + 12 : qend + 12 + len(target)] == target


def test_client_case_is_kept() -> None:
    resolver, _ = make()
    m = ask(resolver, "WWW.Example.org.NS1.svc.cluster.local")
    assert m.question[0].name.to_text() == "WWW.Example.org.NS1.svc.cluster.local."
    assert rrs(m.answer)[0][3] == "WWW.Example.org."


def test_cluster_candidate_comes_from_the_map() -> None:
    resolver, fwd = make()
    m = ask(resolver, "svc1.ns1.ns1.svc.cluster.local")
    assert rrs(m.answer) == [
        ("svc1.ns1.ns1.svc.cluster.local.", "CNAME", 30, "svc1.ns1.svc.cluster.local."),
        ("svc1.ns1.svc.cluster.local.", "A", 30, "10.96.1.1"),
    ]
    assert m.flags & dns.flags.AA
    assert fwd.asked == []


def test_nothing_found_is_nxdomain_and_the_client_searches_on() -> None:
    resolver, fwd = make()
    m = ask(resolver, "nope.example.org.ns1.svc.cluster.local")
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert m.answer == []
    assert rrs(m.authority)[0][:2] == ("cluster.local.", "SOA")  # the cluster's own SOA
    assert fwd.asked == [("nope.example.org", "A")]
    assert resolver.stats.autopath == {"hit": 0, "miss": 1}


def test_nodata_at_the_end_is_cname_and_nodata() -> None:
    resolver, fwd = make()
    m = ask(resolver, "v4only.example.org.ns1.svc.cluster.local", "AAAA")
    assert m.rcode() == dns.rcode.NOERROR
    assert rrs(m.answer) == [
        ("v4only.example.org.ns1.svc.cluster.local.", "CNAME", 30, "v4only.example.org."),
    ]
    assert [r[:2] for r in rrs(m.authority)] == [("example.org.", "SOA")]
    assert resolver.stats.autopath["hit"] == 1


def test_node_search_domains_come_before_the_bare_name() -> None:
    resolver, fwd = make(node_search=("corp.test",))
    m = ask(resolver, "db.ns1.svc.cluster.local")
    assert rrs(m.answer) == [
        ("db.ns1.svc.cluster.local.", "CNAME", 30, "db.corp.test."),
        ("db.corp.test.", "A", 300, "192.0.2.90"),
    ]
    # Asked together: the bare name too, though db.corp.test decided.
    assert sorted(fwd.asked) == [("db", "A"), ("db.corp.test", "A")]


def test_nodata_with_data_later_is_left_to_the_client() -> None:
    # mixed.corp.test has no AAAA but mixed has: glibc would search on and find it, musl
    # would stop at NODATA.  Autopath cannot answer for both: the asked name's NXDOMAIN.
    resolver, _ = make(node_search=("corp.test",))
    m = ask(resolver, "mixed.ns1.svc.cluster.local", "AAAA")
    assert m.rcode() == dns.rcode.NXDOMAIN and m.answer == []
    assert resolver.stats.autopath == {"hit": 0, "miss": 1}


def test_servfail_is_left_to_the_client() -> None:
    resolver, _ = make(failing=frozenset({"www.example.org"}))
    m = ask(resolver, "www.example.org.ns1.svc.cluster.local")
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert resolver.stats.autopath["miss"] == 1


def test_unknown_client_disabled_and_junk_stay_local() -> None:
    resolver, fwd = make()
    for client in (None, "10.9.9.9"):
        m = ask(resolver, "www.example.org.ns1.svc.cluster.local", client=client)
        assert m.rcode() == dns.rcode.NXDOMAIN
    # Not this pod's first expansion (another namespace's): junk, answered here.
    assert ask(resolver, "www.example.org.ns2.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert ask(resolver, "www.example.org.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert fwd.asked == []
    off, fwd_off = make(enabled=False)
    assert ask(off, "www.example.org.ns1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert fwd_off.asked == [] and off.stats.autopath == {"hit": 0, "miss": 0}


def test_custom_search_list_is_followed() -> None:
    custom = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "custom", "namespace": "ns2"},
        "spec": {
            "dnsPolicy": "None",
            "dnsConfig": {"searches": ["ns2.svc.cluster.local", "corp.test"]},
        },
        "status": {"podIP": "10.244.0.77"},
    }
    resolver, fwd = make(extra=[custom])
    m = ask(resolver, "db.ns2.svc.cluster.local", client="10.244.0.77")
    assert rrs(m.answer)[0][3] == "db.corp.test."
    # svc.cluster.local and cluster.local are not in this pod's list: never tried.
    assert sorted(fwd.asked) == [("db", "A"), ("db.corp.test", "A")]


def test_long_custom_search_lists_get_no_autopath() -> None:
    searches = ["ns2.svc.cluster.local"] + [f"d{i}.test" for i in range(6)]
    custom = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "custom", "namespace": "ns2"},
        "spec": {"dnsPolicy": "None", "dnsConfig": {"searches": searches}},
        "status": {"podIP": "10.244.0.78"},
    }
    resolver, fwd = make(extra=[custom])
    m = ask(resolver, "db.ns2.svc.cluster.local", client="10.244.0.78")
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert fwd.asked == []  # six domains and the bare name: seven, over the bound


def test_udp_limit_truncates_the_composed_answer() -> None:
    big = {"big.example.org": {"TXT": [f'"{i}{"x" * 200}"' for i in range(5)]}}
    resolver, fwd = make()
    fwd.records = {**RECORDS, **big}
    m = ask(resolver, "big.example.org.ns1.svc.cluster.local", "TXT")
    # RFC 2181 9: TC, with the whole records that fit: the CNAME and some of the TXT.
    assert m.flags & dns.flags.TC and len(m.to_wire()) <= 512
    assert [r.rdtype for r in m.answer] == [dns.rdatatype.CNAME, dns.rdatatype.TXT]
    assert 1 <= len(m.answer[1]) < 5
    q = dns.message.make_query("big.example.org.ns1.svc.cluster.local", "TXT")
    wire = asyncio.run(resolver.resolve(q.to_wire(), tcp=True, client=(POD_IP, 1)))
    assert wire is not None and len(dns.message.from_wire(wire).answer) == 2  # CNAME, TXT


@pytest.mark.parametrize("rtype", ["A", "AAAA"])
def test_request_figures(rtype: str) -> None:
    resolver, _ = make()
    q = dns.message.make_query("svc1.ns1.svc.cluster.local", rtype).to_wire()
    assert resolver.fast(q) is not None
    mesh = dns.message.make_query("auto.mesh.test", "A").to_wire()
    assert resolver.fast(mesh) is not None
    resolver.fast_batch(2, 40_000, 2)  # 20 µs each
    ask(resolver, "www.example.org", rtype)
    ask(resolver, "www.example.org", rtype)
    ask(resolver, "junk.svc.cluster.local", rtype)
    totals = resolver.stats.totals()
    assert totals[("udp", rtype, "NOERROR", "authoritative")] == 1
    assert totals[("udp", "A", "NOERROR", "mesh")] == 1
    assert totals[("udp", rtype, "NOERROR", "upstream")] == 1
    assert totals[("udp", rtype, "NOERROR", "cache")] == 1
    assert totals[("udp", rtype, "NXDOMAIN", "authoritative")] == 1
    # Both authoritative answers are recorded: the batch's 20 µs in the first bucket, the
    # careful path's junk NXDOMAIN wherever this machine's clock put it (no timing here).
    authoritative = resolver.stats.durations["authoritative"].counts
    assert authoritative[0] >= 1 and sum(authoritative) == 2
    assert resolver.stats.durations["mesh"].counts[0] == 1
    resolver.fast_batch(1, 2_000_000, 1)  # a stalled loop: 2 ms
    assert resolver.stats.durations["authoritative"].counts[4] == 1  # le=0.0025


def test_every_precomputed_answer_is_noerror() -> None:
    """The hot path counts its answers without looking at the RCODE: keep it true."""
    resolver, _ = make()
    assert {a.rcode for a in resolver.smap.answers.values()} == {0}

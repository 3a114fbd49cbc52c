"""The Kubernetes DNS specification (schema 1.1.0) and mesh VIPs, asked of a running
``interceptor serve`` with a real DNS client library (dnspython) over UDP and TCP."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.helpers import Dnsmasq, Served

Z = "cluster.local"
PROTOS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]


def answers(msg: dns.message.Message, rtype: str | None = None) -> list[str]:
    out = []
    for rrset in msg.answer:
        if rtype is None or dns.rdatatype.to_text(rrset.rdtype) == rtype:
            out += [r.to_text() for r in rrset]
    return sorted(out)


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


def soa_in_authority(msg: dns.message.Message) -> bool:
    return any(r.rdtype == dns.rdatatype.SOA and r.name.to_text() == f"{Z}." for r in msg.authority)


# --- ClusterIP services ------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_clusterip_a(served: Served, tcp: bool) -> None:
    m = served.ask(f"svc1.ns1.svc.{Z}", "A", tcp=tcp)
    assert rcode(m) == "NOERROR"
    assert m.flags & dns.flags.AA and m.flags & dns.flags.QR
    assert answers(m) == ["10.96.1.1"]
    assert m.answer[0].ttl == 30


@pytest.mark.parametrize("tcp", PROTOS)
def test_dual_stack_has_both_families(served: Served, tcp: bool) -> None:
    assert answers(served.ask(f"dual.ns1.svc.{Z}", "A", tcp=tcp)) == ["10.96.1.2"]
    assert answers(served.ask(f"dual.ns1.svc.{Z}", "AAAA", tcp=tcp)) == ["fd00:96::2"]


@pytest.mark.parametrize("tcp", PROTOS)
def test_missing_type_is_nodata_with_soa(served: Served, tcp: bool) -> None:
    m = served.ask(f"svc1.ns1.svc.{Z}", "AAAA", tcp=tcp)
    assert rcode(m) == "NOERROR" and not m.answer and soa_in_authority(m)
    m = served.ask(f"v6only.ns1.svc.{Z}", "A", tcp=tcp)
    assert rcode(m) == "NOERROR" and not m.answer and soa_in_authority(m)
    m = served.ask(f"svc1.ns1.svc.{Z}", "MX", tcp=tcp)
    assert rcode(m) == "NOERROR" and not m.answer and soa_in_authority(m)


@pytest.mark.parametrize("tcp", PROTOS)
def test_unknown_name_is_nxdomain_with_soa(served: Served, tcp: bool) -> None:
    m = served.ask(f"nope.ns1.svc.{Z}", "A", tcp=tcp)
    assert rcode(m) == "NXDOMAIN" and soa_in_authority(m)
    soa = m.authority[0][0]
    assert soa.minimum == 30 and m.authority[0].ttl == 30


def test_case_insensitive_and_echoes_case(served: Served) -> None:
    m = served.ask("SvC1.NS1.svc.Cluster.Local", "A")
    assert answers(m) == ["10.96.1.1"]
    assert m.answer[0].name.to_text() == "SvC1.NS1.svc.Cluster.Local."
    assert m.question[0].name.to_text() == "SvC1.NS1.svc.Cluster.Local."


# --- headless services --------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_headless_ready_endpoints_only(served: Served, tcp: bool) -> None:
    m = served.ask(f"hdls.ns1.svc.{Z}", "A", tcp=tcp)
    # 172.0.0.2 is in two slices: answered once.  172.0.0.4 is not ready.
    assert answers(m) == ["172.0.0.2", "172.0.0.3", "172.0.0.5", "172.0.0.6"]
    assert answers(served.ask(f"hdls.ns1.svc.{Z}", "AAAA", tcp=tcp)) == ["5678:abcd::1"]


def test_headless_endpoint_names(served: Served) -> None:
    assert answers(served.ask(f"pet-0.hdls.ns1.svc.{Z}")) == ["172.0.0.2"]
    assert answers(served.ask(f"172-0-0-3.hdls.ns1.svc.{Z}")) == ["172.0.0.3"]
    assert answers(served.ask(f"shared.hdls.ns1.svc.{Z}")) == ["172.0.0.5", "172.0.0.6"]
    assert answers(served.ask(f"5678-abcd--1.hdls.ns1.svc.{Z}", "AAAA")) == ["5678:abcd::1"]
    assert rcode(served.ask(f"172-0-0-4.hdls.ns1.svc.{Z}")) == "NXDOMAIN"  # not ready
    # An endpoint with a hostname has no dashed-IP name (CoreDNS's endpointHostname).
    assert rcode(served.ask(f"172-0-0-2.hdls.ns1.svc.{Z}")) == "NXDOMAIN"


def test_headless_without_ready_endpoints_is_nxdomain(served: Served) -> None:
    assert rcode(served.ask(f"notready.ns1.svc.{Z}")) == "NXDOMAIN"


def test_publish_not_ready_addresses(served: Served) -> None:
    assert answers(served.ask(f"publish.ns1.svc.{Z}")) == ["172.0.2.1"]


# --- SRV ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_srv_clusterip_named_ports(served: Served, tcp: bool) -> None:
    m = served.ask(f"_http._tcp.svc1.ns1.svc.{Z}", "SRV", tcp=tcp)
    assert answers(m) == [f"0 100 80 svc1.ns1.svc.{Z}."]
    assert [r.to_text() for rr in m.additional for r in rr if rr.rdtype == 1] == ["10.96.1.1"]
    m = served.ask(f"_dns._udp.svc1.ns1.svc.{Z}", "SRV", tcp=tcp)
    assert answers(m) == [f"0 100 53 svc1.ns1.svc.{Z}."]
    assert rcode(served.ask(f"_http._udp.svc1.ns1.svc.{Z}", "SRV", tcp=tcp)) == "NXDOMAIN"


def test_srv_empty_non_terminal_and_unnamed_port(served: Served) -> None:
    m = served.ask(f"_tcp.svc1.ns1.svc.{Z}", "SRV")
    assert rcode(m) == "NOERROR" and not m.answer
    # The unnamed port 8080 has no _<port> record, only the CoreDNS-style service SRV.
    m = served.ask(f"svc1.ns1.svc.{Z}", "SRV")
    assert sorted(int(a.split()[2]) for a in answers(m)) == [53, 80, 8080]


def test_srv_headless_per_endpoint(served: Served) -> None:
    m = served.ask(f"_http._tcp.hdls.ns1.svc.{Z}", "SRV", tcp=True)
    targets = sorted(a.split()[3] for a in answers(m))
    assert targets == [
        f"172-0-0-3.hdls.ns1.svc.{Z}.",
        f"5678-abcd--1.hdls.ns1.svc.{Z}.",
        f"pet-0.hdls.ns1.svc.{Z}.",
        f"shared.hdls.ns1.svc.{Z}.",
    ]
    assert {a.split()[2] for a in answers(m)} == {"8080"}  # the endpoint port
    extra = sorted(r.to_text() for rr in m.additional for r in rr if rr.rdtype in (1, 28))
    assert extra == ["172.0.0.2", "172.0.0.3", "172.0.0.5", "172.0.0.6", "5678:abcd::1"]


# --- PTR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_ptr(served: Served, tcp: bool) -> None:
    assert answers(served.ask("1.1.96.10.in-addr.arpa", "PTR", tcp=tcp)) == [f"svc1.ns1.svc.{Z}."]
    assert answers(served.ask("2.0.0.172.in-addr.arpa", "PTR", tcp=tcp)) == [
        f"pet-0.hdls.ns1.svc.{Z}."
    ]  # deduplicated across the two slices
    v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.8.7.6.5.ip6.arpa"
    assert answers(served.ask(v6, "PTR", tcp=tcp)) == [f"5678-abcd--1.hdls.ns1.svc.{Z}."]
    v6svc = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa"
    assert answers(served.ask(v6svc, "PTR", tcp=tcp)) == [f"dual.ns1.svc.{Z}."]


# --- ExternalName -------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_externalname_cname_then_upstream_records(served: Served, tcp: bool) -> None:
    m = served.ask(f"ext.ns1.svc.{Z}", "A", tcp=tcp)
    assert rcode(m) == "NOERROR"
    assert [dns.rdatatype.to_text(r.rdtype) for r in m.answer] == ["CNAME", "A"]
    assert answers(m, "CNAME") == ["www.upstream.test."]
    assert answers(m, "A") == ["192.0.2.53"]


def test_externalname_in_cluster_target(served: Served) -> None:
    m = served.ask(f"alias.ns1.svc.{Z}", "A")
    assert answers(m, "CNAME") == [f"svc1.ns1.svc.{Z}."] and answers(m, "A") == ["10.96.1.1"]
    m = served.ask(f"alias.ns1.svc.{Z}", "CNAME")
    assert answers(m) == [f"svc1.ns1.svc.{Z}."]


def test_below_externalname_is_nxdomain(served: Served) -> None:
    assert rcode(served.ask(f"x.ext.ns1.svc.{Z}")) == "NXDOMAIN"


# --- zone apex, schema version, structure ---------------------------------------------------


def test_dns_version_soa_ns(served: Served) -> None:
    assert answers(served.ask(f"dns-version.{Z}", "TXT")) == ['"1.1.0"']
    soa = answers(served.ask(Z, "SOA"))
    assert len(soa) == 1 and soa[0].startswith(f"ns.dns.{Z}. hostmaster.{Z}.")
    m = served.ask(Z, "NS")
    assert answers(m) == [f"ns.dns.{Z}."]
    assert [r.to_text() for rr in m.additional for r in rr if rr.rdtype == 1] == ["10.96.0.10"]


@pytest.mark.parametrize("name", [f"svc.{Z}", f"ns1.svc.{Z}", f"empty-ns.svc.{Z}", f"pod.{Z}"])
def test_empty_non_terminals_are_nodata(served: Served, name: str) -> None:
    m = served.ask(name, "A")
    assert rcode(m) == "NOERROR" and not m.answer and soa_in_authority(m)


@pytest.mark.parametrize("tcp", PROTOS)
def test_zone_transfer_refused(served: Served, tcp: bool) -> None:
    assert rcode(served.ask(Z, "AXFR", tcp=True)) == "REFUSED"
    assert rcode(served.ask(Z, "IXFR", tcp=tcp)) == "REFUSED"


# --- pods -----------------------------------------------------------------------------------


def test_pod_records_insecure(served: Served) -> None:
    assert answers(served.ask(f"10-1-2-3.ns1.pod.{Z}")) == ["10.1.2.3"]
    assert answers(served.ask(f"fd00--7.ns1.pod.{Z}", "AAAA")) == ["fd00::7"]
    assert rcode(served.ask(f"10-1-2-3.nosuchns.pod.{Z}")) == "NXDOMAIN"
    assert rcode(served.ask(f"not-an-ip.ns1.pod.{Z}")) == "NXDOMAIN"


# --- search-path junk -----------------------------------------------------------------------


def test_search_path_junk_is_local_nxdomain(served: Served, upstream: Dnsmasq) -> None:
    for name in [
        f"www.upstream.test.ns1.svc.{Z}",
        f"www.upstream.test.svc.{Z}",
        f"www.upstream.test.{Z}",
    ]:
        assert rcode(served.ask(name)) == "NXDOMAIN"
        assert upstream.queries(name) == [], f"{name} leaked upstream"


# --- mesh VIPs --------------------------------------------------------------------------------


def test_mesh_auto_vip_is_in_range_and_stable(served: Served) -> None:
    a = answers(served.ask("auto.mesh.test"))
    b = answers(served.ask("auto2.mesh.test"))
    assert len(a) == 1 and a[0].startswith("240.240.") and len(b) == 1 and a != b
    assert answers(served.ask("AUTO.mesh.test")) == a
    m = served.ask("auto.mesh.test", "AAAA")  # --ipv6 is off
    assert rcode(m) == "NOERROR" and not m.answer


def test_mesh_given_status_wildcard_and_none(served: Served, upstream: Dnsmasq) -> None:
    assert answers(served.ask("given.mesh.test")) == ["192.0.2.10"]
    assert answers(served.ask("given.mesh.test", "AAAA")) == ["2001:db8::10"]
    assert answers(served.ask("status.mesh.test")) == ["240.240.7.7"]
    assert answers(served.ask("a.b.wild.test")) == ["192.0.2.20"]
    served.ask("none.mesh.test")  # resolution NONE: forwarded, not answered locally
    assert upstream.queries("none.mesh.test")


# --- forwarding -------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", PROTOS)
def test_forwarding(served: Served, tcp: bool) -> None:
    m = served.ask("www.upstream.test", "A", tcp=tcp)
    assert rcode(m) == "NOERROR" and answers(m) == ["192.0.2.53"]
    assert rcode(served.ask("missing.upstream.test", tcp=tcp)) == "NXDOMAIN"


def test_forwarded_big_answer_uses_tcp_upstream(served: Served) -> None:
    m = served.ask("big.upstream.test", "TXT", tcp=True)
    assert rcode(m) == "NOERROR" and len(answers(m)) == 1
    # Over UDP without EDNS the client gets TC and retries over TCP itself.
    m = served.ask("big.upstream.test", "TXT", use_edns=False)
    assert m.flags & dns.flags.TC and not m.answer

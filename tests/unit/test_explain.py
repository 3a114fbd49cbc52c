"""`interceptor query`'s explanations against the real resolver and service map."""

from __future__ import annotations

import pytest

from interceptor.model.servicemap import ServiceMap
from interceptor.ops.explain import explain, qtype_code, services
from interceptor.resolve.resolver import Resolver
from interceptor.resolve.upstream import Forwarder
from interceptor.settings import Endpoint, Settings, UpstreamSettings, ZoneSettings

A, AAAA, SRV, PTR, CNAME = 1, 28, 33, 12, 5


@pytest.mark.parametrize(
    ("name", "qtype", "rule", "objects"),
    [
        ("svc1.ns1.svc.cluster.local", A, "clusterip-service", ["Service ns1/svc1"]),
        ("svc1.ns1.svc.cluster.local", AAAA, "nodata", ["Service ns1/svc1"]),
        (
            "hdls.ns1.svc.cluster.local",
            A,
            "headless-service",
            [
                "Service ns1/hdls",
                "EndpointSlice ns1/hdls-a",
                "EndpointSlice ns1/hdls-b",
                "EndpointSlice ns1/hdls-v6",
            ],
        ),
        (
            "pet-0.hdls.ns1.svc.cluster.local",
            A,
            "headless-endpoint",
            ["Service ns1/hdls", "EndpointSlice ns1/hdls-a", "EndpointSlice ns1/hdls-b"],
        ),
        ("_http._tcp.svc1.ns1.svc.cluster.local", SRV, "srv", ["Service ns1/svc1"]),
        ("1.1.96.10.in-addr.arpa", PTR, "ptr", ["Service ns1/svc1"]),
        ("ext.ns1.svc.cluster.local", A, "externalname", ["Service ns1/ext"]),
        ("auto.mesh.test", A, "mesh-vip", ["ServiceEntry ns1/auto"]),
        ("x.y.wild.test", A, "mesh-wildcard", ["ServiceEntry ns1/wild"]),
        ("10-1-2-3.ns1.pod.cluster.local", A, "pod-record", ["Namespace ns1"]),
        ("ns1.svc.cluster.local", A, "empty-non-terminal", ["Namespace ns1"]),
        ("example.com.ns1.svc.cluster.local", A, "search-path-junk", ["Namespace ns1"]),
        ("nope.cluster.local", A, "nxdomain", []),
        ("dns-version.cluster.local", 16, "apex", ["Service kube-system/kube-dns"]),
        ("www.example.com", A, "forwarded", []),
    ],
)
def test_explanations(
    resolver: Resolver, name: str, qtype: int, rule: str, objects: list[str]
) -> None:
    why = explain(resolver, name, qtype, None)
    assert (why.rule, why.objects) == (rule, objects), why.detail
    if rule == "forwarded":
        assert why.upstreams == ["127.0.0.1:9"]


def test_explanation_before_the_first_sync(resolver: Resolver) -> None:
    resolver.ready = False
    try:
        assert explain(resolver, "svc1.ns1.svc.cluster.local", A, None).rule == "not-synced"
        assert explain(resolver, "www.example.com", A, None).rule == "forwarded"
    finally:
        resolver.ready = True


def test_services_listing_and_filters(resolver: Resolver) -> None:
    all_ = services(resolver)
    svc1 = [s for s in all_ if s["name"] == "svc1"][0]
    assert svc1["type"] == "ClusterIP" and svc1["addresses"] == ["10.96.1.1"]
    assert "http:80/tcp" in svc1["ports"]
    assert {s["dns_name"] for s in services(resolver, "auto")} == {
        "auto.mesh.test",
        "auto2.mesh.test",
    }
    hdls = services(resolver, "ns1/hdls")
    assert len(hdls) == 1 and hdls[0]["type"] == "Headless"
    assert "172.0.0.4" not in hdls[0]["addresses"]  # not ready
    assert services(resolver, "ext.ns1.svc.cluster.local")[0]["external_name"] == (
        "www.upstream.test"
    )
    assert services(resolver, "no-such") == []


def test_qtype_names() -> None:
    assert (qtype_code("aaaa"), qtype_code("TYPE65"), qtype_code("33")) == (28, 65, 33)
    with pytest.raises(ValueError):
        qtype_code("BOGUS")


def test_forwarding_explanations_follow_the_servers_in_effect() -> None:
    m = ServiceMap(ZoneSettings())
    s = Settings(
        upstream=UpstreamSettings(
            servers=(Endpoint("192.0.2.1", 53),),
            zones=(("corp.example", (Endpoint("192.0.2.9", 5353),)),),
        )
    )
    r = Resolver(m, Forwarder(s.upstream), s, [Endpoint("127.0.0.1", 9)])
    why = explain(r, "db.corp.example", A, None)
    assert "corp.example" in why.detail and why.upstreams == ["192.0.2.9:5353"]
    why = explain(r, "www.example.org", A, ("10.244.1.10", 0))
    assert "--upstream" in why.detail and why.upstreams == ["192.0.2.1:53"]

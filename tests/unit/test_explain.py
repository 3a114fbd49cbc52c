"""`interceptor query`'s explanations: the real resolver decides (its rule is reported, not
guessed), then the description and the objects behind the answer, against the real map."""

from __future__ import annotations

import asyncio
import time

import pytest

from interceptor.dns.codes import type_code
from interceptor.dns.message import build_query
from interceptor.model.servicemap import ServiceMap
from interceptor.ops.explain import Explanation, for_client, services
from interceptor.resolve.cache import Cache
from interceptor.resolve.decision import Client
from interceptor.resolve.resolver import Resolver
from interceptor.settings import (
    CacheSettings,
    Endpoint,
    Settings,
    UpstreamSettings,
    ZoneSettings,
)
from tests.unit.fakes import FakeForwarder

A, AAAA, SRV, PTR, CNAME = 1, 28, 33, 12, 5


def explain(resolver: Resolver, name: str, qtype: int, client: Client | None) -> Explanation:
    """What ``interceptor query`` does: the resolver decides, the decision is described."""
    decision = asyncio.run(resolver.decide(build_query(name, qtype), False, client))
    return for_client(resolver, decision, name, qtype, client)


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
    resolver.synced.is_open = False
    try:
        assert explain(resolver, "svc1.ns1.svc.cluster.local", A, None).rule == "not-synced"
        assert explain(resolver, "www.example.com", A, None).rule == "forwarded"
    finally:
        resolver.synced.is_open = True


def test_services_listing_and_filters(resolver: Resolver) -> None:
    all_ = services(resolver.smap)
    svc1 = [s for s in all_ if s["name"] == "svc1"][0]
    assert svc1["type"] == "ClusterIP" and svc1["addresses"] == ["10.96.1.1"]
    assert "http:80/tcp" in svc1["ports"]
    assert {s["dns_name"] for s in services(resolver.smap, "auto")} == {
        "auto.mesh.test",
        "auto2.mesh.test",
    }
    hdls = services(resolver.smap, "ns1/hdls")
    assert len(hdls) == 1 and hdls[0]["type"] == "Headless"
    assert "172.0.0.4" not in hdls[0]["addresses"]  # not ready
    assert services(resolver.smap, "ext.ns1.svc.cluster.local")[0]["external_name"] == (
        "www.upstream.test"
    )
    assert services(resolver.smap, "no-such") == []


def test_qtype_names() -> None:
    assert (type_code("aaaa"), type_code("TYPE65"), type_code("33")) == (28, 65, 33)
    with pytest.raises(ValueError):
        type_code("BOGUS")
    with pytest.raises(ValueError):
        type_code("70000")


def test_forwarding_explanations_follow_the_servers_in_effect() -> None:
    m = ServiceMap(ZoneSettings())
    s = Settings(
        upstream=UpstreamSettings(
            servers=(Endpoint("192.0.2.1", 53),),
            zones=(("corp.example", (Endpoint("192.0.2.9", 5353),)),),
        )
    )
    r = Resolver(m, FakeForwarder({}), s, [Endpoint("127.0.0.1", 9)])
    why = explain(r, "db.corp.example", A, None)
    assert "corp.example" in why.detail and why.upstreams == ["192.0.2.9:5353"]
    why = explain(r, "www.example.org", A, ("10.244.1.10", 0))
    assert "--upstream" in why.detail and why.upstreams == ["192.0.2.1:53"]


def test_the_cache_and_serve_stale_are_the_resolvers_own_report() -> None:
    m = ServiceMap(ZoneSettings())
    s = Settings()
    fwd = FakeForwarder({"www.example.org": {"A": ["192.0.2.80"]}})
    r = Resolver(m, fwd, s, [Endpoint("192.0.2.53", 53)], cache=Cache(stale_for=3600))
    assert explain(r, "www.example.org", A, None).rule == "forwarded"
    why = explain(r, "www.example.org", A, None)
    assert why.rule == "cached" and why.upstreams == ["192.0.2.53:53"], why
    assert r.cache is not None
    for entry in r.cache.entries.values():
        entry.expires = entry.stored  # expired now, within the stale window
    fwd.failing = frozenset({"www.example.org", "new.example.org"})
    assert explain(r, "www.example.org", A, None).rule == "stale"
    assert explain(r, "new.example.org", A, None).rule == "upstream-failed"


def _expire(r: Resolver) -> None:
    assert r.cache is not None
    for entry in r.cache.entries.values():
        entry.expires = entry.stored  # expired now, within the stale window


def test_a_slow_upstream_gets_the_stale_answer_within_the_client_timer() -> None:
    m = ServiceMap(ZoneSettings())
    s = Settings(cache=CacheSettings(stale_after=0.3))
    fwd = FakeForwarder({"www.example.org": {"A": ["192.0.2.80"]}})
    r = Resolver(m, fwd, s, [Endpoint("192.0.2.53", 53)], cache=Cache())

    async def run() -> tuple[float, str, str]:
        data = build_query("www.example.org", A)
        await r.decide(data, False, None)
        _expire(r)
        fwd.records["www.example.org"]["A"] = ["192.0.2.81"]
        fwd.slow["www.example.org"] = 1.0
        t0 = time.monotonic()
        stale = await r.decide(data, False, None)
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)  # the refresh goes on and lands in the cache
        fresh = await r.decide(data, False, None)
        return took, stale.rule, fresh.rule + " " + repr(fresh.reply)

    took, stale_rule, fresh = asyncio.run(run())
    assert stale_rule == "stale" and 0.25 < took < 0.9, took
    assert fresh.startswith("cached") and "\\xc0\\x00\\x02Q" in fresh  # 192.0.2.81


@pytest.mark.parametrize("rcode", [2, 5])  # SERVFAIL, REFUSED
def test_an_upstream_servfail_or_refused_gets_the_stale_answer(rcode: int) -> None:
    m = ServiceMap(ZoneSettings())
    fwd = FakeForwarder({"www.example.org": {"A": ["192.0.2.80"]}})
    r = Resolver(m, fwd, Settings(), [Endpoint("192.0.2.53", 53)], cache=Cache())
    assert explain(r, "www.example.org", A, None).rule == "forwarded"
    _expire(r)
    fwd.rcodes["www.example.org"] = rcode
    assert explain(r, "www.example.org", A, None).rule == "stale"
    fwd.rcodes["new.example.org"] = rcode  # nothing stale to give: the upstream's answer
    assert explain(r, "new.example.org", A, None).rule == "forwarded"


def test_query_from_a_pod_says_who_sees_the_mesh_host() -> None:
    from tests.unit.test_visibility import POD, T1, entry, smap_with

    m = smap_with(
        entry("public", "ns3", T1, addresses=["10.3.0.1"]),
        entry("private", "ns1", T1, export_to=["."], addresses=["10.1.0.1"]),
    )
    r = Resolver(m, FakeForwarder({}), Settings(), [Endpoint("127.0.0.1", 9)])
    mine = explain(r, "svc.mesh.test", A, (POD["ns1"], 0))
    assert mine.rule == "mesh-scoped"
    assert mine.visibility[0] == f"{POD['ns1']} is a pod in namespace ns1"
    assert "ns1/private" in mine.visibility[1] and "ns1 sees it" in mine.visibility[1]
    assert mine.visibility[-1].startswith("so it is answered 10.1.0.1")
    other = explain(r, "svc.mesh.test", A, (POD["ns2"], 0))
    assert "namespace ns2 does not see it" in other.visibility[1]
    assert "ns3/public" in other.visibility[2] and "sees it" in other.visibility[2]
    assert other.visibility[-1].startswith("so it is answered 10.3.0.1")
    stranger = explain(r, "svc.mesh.test", A, ("10.9.9.9", 0))
    assert "no known pod" in stranger.visibility[0]
    assert explain(r, "svc1.ns1.svc.cluster.local", A, (POD["ns1"], 0)).visibility == []

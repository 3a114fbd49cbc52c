"""The service map as a pure model: incremental events must land exactly where a rebuild from
scratch lands, whatever the order."""

from __future__ import annotations

import random
from typing import Any

import pytest

from interceptor.dns import wire
from interceptor.dns.message import Answer
from interceptor.model.objects import KubeObject, parse
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import PodRecords, ZoneSettings
from interceptor.sources.yamlfile import load_file
from tests.helpers import DATA

Z = "cluster.local"


def key(name: str, qtype: int) -> bytes:
    return wire.encode_name(name) + qtype.to_bytes(2, "big")


def svc(name: str, ns: str = "ns1", ip: str | None = "10.96.0.1", **spec: Any) -> KubeObject:
    body: dict[str, Any] = {"ports": [{"name": "http", "port": 80}], **spec}
    body["clusterIP"] = ip if ip is not None else "None"
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": body,
        }
    )


def eps(name: str, service: str, ips: list[str], ready: bool = True, ns: str = "ns1") -> KubeObject:
    return parse(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": service},
            },
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
        }
    )


def se(name: str, hosts: list[str], created: str, **spec: Any) -> KubeObject:
    return parse(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "ns1", "creationTimestamp": created},
            "spec": {"hosts": hosts, "resolution": "DNS", **spec},
        }
    )


def snapshot(m: ServiceMap) -> dict[bytes, tuple[int, int, int, int, bytes]]:
    """Every answer the map gives: the kept A and AAAA ones and those made when asked."""
    made = {}
    for k in m._rrs:
        name, _ = wire.decode_name_plain(k[:-2], 0)
        answer = m.answer(name, int.from_bytes(k[-2:], "big"))
        if answer is not None:
            made[k] = answer
    return {k: (a.rcode, a.an, a.ns, a.ar, a.body) for k, a in {**made, **m.answers}.items()}


def made(m: ServiceMap, name: str, qtype: int) -> Answer:
    answer = m.answer(name, qtype)
    assert answer is not None, (name, qtype)
    return answer


def fresh(objects: list[KubeObject], **zone: Any) -> ServiceMap:
    m = ServiceMap(ZoneSettings(**zone))
    for o in objects:
        m.upsert(o)
    return m


def test_clusterip_answer_and_removal() -> None:
    m = ServiceMap(ZoneSettings())
    empty = snapshot(m)
    m.upsert(svc("a"))
    assert key(f"a.ns1.svc.{Z}", wire.A) in m.answers
    assert m.exists(f"ns1.svc.{Z}")
    m.delete(("Service", "ns1", "a"))
    assert snapshot(m) == empty
    assert not m.exists(f"ns1.svc.{Z}")


def test_ptr_survives_until_last_contributor_goes() -> None:
    m = fresh([svc("h", ip=None), eps("h-1", "h", ["172.0.0.9"]), eps("h-2", "h", ["172.0.0.9"])])
    ptr = "9.0.0.172.in-addr.arpa"
    assert made(m, ptr, wire.PTR).an == 1
    m.delete(("EndpointSlice", "ns1", "h-1"))
    assert made(m, ptr, wire.PTR).an == 1
    m.delete(("EndpointSlice", "ns1", "h-2"))
    assert m.answer(ptr, wire.PTR) is None


def test_endpoint_turning_unready_removes_it() -> None:
    m = fresh([svc("h", ip=None), eps("h-1", "h", ["172.0.0.9", "172.0.0.10"])])
    assert m.answers[key(f"h.ns1.svc.{Z}", wire.A)].an == 2
    m.upsert(eps("h-1", "h", ["172.0.0.9", "172.0.0.10"], ready=False))
    assert key(f"h.ns1.svc.{Z}", wire.A) not in m.answers
    assert not m.exists(f"h.ns1.svc.{Z}")  # spec 2.4.1: NXDOMAIN


def test_srv_additional_follows_endpoint_changes() -> None:
    m = fresh([svc("h", ip=None), eps("h-1", "h", ["172.0.0.9"])])
    srv = f"_http._tcp.h.ns1.svc.{Z}"
    assert made(m, srv, wire.SRV).ar == 1
    m.upsert(eps("h-2", "h", ["172.0.0.10"]))
    assert made(m, srv, wire.SRV).an == 2 and made(m, srv, wire.SRV).ar == 2


def test_slice_moving_between_services() -> None:
    m = fresh([svc("a", ip=None), svc("b", ip=None), eps("s", "a", ["172.0.0.1"])])
    assert key(f"a.ns1.svc.{Z}", wire.A) in m.answers
    m.upsert(eps("s", "b", ["172.0.0.1"]))
    assert key(f"a.ns1.svc.{Z}", wire.A) not in m.answers
    assert key(f"b.ns1.svc.{Z}", wire.A) in m.answers


def test_apex_ns_glue_follows_dns_service() -> None:
    m = ServiceMap(ZoneSettings())
    assert made(m, Z, wire.NS).ar == 0
    m.upsert(svc("kube-dns", ns="kube-system", ip="10.96.0.10"))
    assert made(m, Z, wire.NS).ar == 1
    assert key(f"ns.dns.{Z}", wire.A) in m.answers


def test_pods_verified_mode_has_records() -> None:
    pod = parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns1"},
            "status": {"podIPs": [{"ip": "10.244.0.5"}]},
        }
    )
    m = fresh([pod], pod_records=PodRecords.VERIFIED)
    assert key(f"10-244-0-5.ns1.pod.{Z}", wire.A) in m.answers
    m.delete(pod.key)
    assert key(f"10-244-0-5.ns1.pod.{Z}", wire.A) not in m.answers


def test_replace_applies_only_the_difference() -> None:
    objs = load_file(DATA / "cluster.yaml").objects
    m = fresh(objs)
    before = dict(m.answers)
    assert m.replace(objs) == 0
    assert all(m.answers[k] is v for k, v in before.items())  # untouched, not rebuilt
    changed = [o for o in objs if o.key != ("Service", "ns1", "svc1")]
    assert m.replace(changed) == 1
    assert key(f"svc1.ns1.svc.{Z}", wire.A) not in m.answers


@pytest.mark.parametrize("seed", range(8))
def test_random_event_order_converges_to_fresh_build(seed: int) -> None:
    """Apply the objects in a random order with random detours (deletes, re-adds, interim
    versions); the answer table must equal the one built from the final set directly."""
    rng = random.Random(seed)
    final = load_file(DATA / "cluster.yaml").objects
    interim = [
        svc("svc1", ip="10.96.9.9"),
        eps("hdls-a", "hdls", ["172.0.0.99"]),
        eps("hdls-a", "svc1", ["172.0.0.98"]),
        se("auto", ["x.mesh.test"], "2023-01-01"),
    ]
    m = ServiceMap(ZoneSettings())
    pool = final + interim
    for _ in range(300):
        obj = rng.choice(pool)
        if rng.random() < 0.3:
            m.delete(obj.key)
        else:
            m.upsert(obj)
    m.replace(final)
    assert snapshot(m) == snapshot(fresh(final))

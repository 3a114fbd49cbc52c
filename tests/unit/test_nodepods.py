from __future__ import annotations

from typing import Any

from interceptor.model.nodepods import node_pods
from interceptor.model.objects import parse
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import ZoneSettings


def pod(
    name: str, ip: str, node: str = "n1", ns: str = "a", host: bool = False, **meta: Any
) -> Any:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, **meta},
            "spec": {"nodeName": node, "hostNetwork": host},
            "status": {"podIPs": [{"ip": ip}] if ip else []},
        }
    )


def test_only_capturable_pods_of_this_node() -> None:
    m = ServiceMap(ZoneSettings())
    for o in [
        pod("app", "10.0.0.1"),
        pod("other-node", "10.0.0.2", node="n2"),
        pod("host", "192.168.1.5", host=True),
        pod("coredns", "10.0.0.3", labels={"k8s-app": "kube-dns"}),
        pod("dns-endpoint", "10.0.0.4"),
        pod("annotated", "10.0.0.5", annotations={"dns-interceptor.io/dns-server": "true"}),
        pod("opted-out", "10.0.0.6", annotations={"dns-interceptor.io/capture": "false"}),
        pod("quiet", "10.0.0.7", ns="q"),
        pod("pending", ""),
        parse(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "q", "labels": {"dns-interceptor.io/capture": "disabled"}},
            }
        ),
        parse(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {
                    "name": "kd",
                    "namespace": "kube-system",
                    "labels": {"kubernetes.io/service-name": "kube-dns"},
                },
                "endpoints": [{"addresses": ["10.0.0.4"]}],
            }
        ),
    ]:
        m.upsert(o)
    keep, skipped = node_pods(m, "n1")
    assert [p.name for p in keep] == ["app"]
    why = {s.name: s.why for s in skipped}
    assert why == {
        "host": "hostNetwork",
        "coredns": "DNS server",
        "dns-endpoint": "DNS server",
        "annotated": "DNS server",
        "opted-out": "annotation dns-interceptor.io/capture=false",
        "quiet": "namespace label dns-interceptor.io/capture=disabled",
        "pending": "no IP yet",
    }

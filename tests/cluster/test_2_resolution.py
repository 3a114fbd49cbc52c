"""Pods of a Deployment, whose resolv.conf the kubelet wrote, resolve through the interceptor:
cluster names, a mesh host only the interceptor can answer, a headless StatefulSet's pod
names, and an external-style name forwarded through kube-dns (kube-proxy's DNAT) to CoreDNS,
over UDP and TCP; the agent's per-pod counters show each pod."""

from __future__ import annotations

import ipaddress
import re

from tests.cluster.conftest import EXTERNAL, MESH_HOST, NS, Workload
from tests.cluster.node import CLUSTER_DOMAIN, DNS_IP


def counters(workload: Workload) -> dict[str, int]:
    """interceptor_bpf_pod_queries_total per pod of the test namespace."""
    out: dict[str, int] = {}
    for line in workload.kube.metrics().splitlines():
        m = re.match(r"interceptor_bpf_pod_queries_total\{(.*)\} (\S+)", line)
        if m and f'namespace="{NS}"' in m.group(1):
            pod = re.search(r'pod="([^"]+)"', m.group(1))
            assert pod
            out[pod.group(1)] = int(float(m.group(2)))
    return out


def test_kubelet_wrote_cluster_first_resolv_conf(workload: Workload) -> None:
    conf = workload.kube.exec(NS, workload.clients[0], "cat", "/etc/resolv.conf")
    assert f"nameserver {DNS_IP}" in conf
    assert f"search {NS}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}" in conf
    assert "ndots:5" in conf


def test_each_pod_resolves_through_the_interceptor(workload: Workload) -> None:
    kube = workload.kube
    web = kube.json("-n", NS, "get", "svc", "web")["spec"]["clusterIP"]
    db_pods = kube.json("-n", NS, "get", "pods", "-l", "app=db")["items"]
    db0 = next(p["status"]["podIP"] for p in db_pods if p["metadata"]["name"] == "db-0")
    before = counters(workload)
    for pod in workload.clients:
        # glibc getaddrinfo through the search path (short name), and dig.
        got = kube.exec(NS, pod, "getent", "ahostsv4", "web").split()
        assert got and got[0] == web, got
        assert workload.ask(pod, f"web.{NS}.svc.{CLUSTER_DOMAIN}") == web
        # The mesh host: CoreDNS would say NXDOMAIN; only the interceptor knows the VIP.
        vip = workload.ask(pod, MESH_HOST)
        assert ipaddress.ip_address(vip) in ipaddress.ip_network("240.240.0.0/16"), vip
        assert kube.exec(NS, pod, "getent", "ahostsv4", MESH_HOST).split()[0] == vip
        # A headless StatefulSet's stable pod name.
        assert workload.ask(pod, f"db-0.db.{NS}.svc.{CLUSTER_DOMAIN}") == db0
        # Forwarded: interceptor -> kube-dns ClusterIP (kube-proxy DNAT) -> CoreDNS -> upstream.
        assert workload.ask(pod, EXTERNAL[0]) == EXTERNAL[1]
        # The same over TCP.
        assert workload.ask(pod, "+tcp", f"web.{NS}.svc.{CLUSTER_DOMAIN}") == web
        assert workload.ask(pod, "+tcp", MESH_HOST) == vip
        assert workload.ask(pod, "+tcp", EXTERNAL[0]) == EXTERNAL[1]
    after = counters(workload)
    for pod in workload.clients:
        assert after.get(pod, 0) - before.get(pod, 0) >= 8, (pod, before, after)


def test_coredns_cannot_answer_the_mesh_host(workload: Workload) -> None:
    """The control: asked directly (a CoreDNS pod's IP is not captured), CoreDNS says
    NXDOMAIN, so the VIP above came from the interceptor."""
    kube = workload.kube
    pods = kube.json("-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-dns")["items"]
    coredns_ip = pods[0]["status"]["podIP"]
    out = kube.exec(NS, workload.clients[0], "dig", f"@{coredns_ip}", "+time=2", "+tries=1",
                    MESH_HOST)  # fmt: skip
    assert "status: NXDOMAIN" in out, out

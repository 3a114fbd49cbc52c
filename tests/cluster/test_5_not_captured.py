"""Left alone: hostNetwork pods (ClusterFirstWithHostNet) and the CoreDNS pods are not
captured, and they still resolve."""

from __future__ import annotations

import json
import subprocess

from tests.cluster import images, node
from tests.cluster.conftest import NS, Kube, Workload

TC_HANDLE = "0x1d5"  # the DaemonSet's --tc-handle default: our filters and only ours


def our_filters(dev: str) -> list[str]:
    out = []
    for direction in ("ingress", "egress"):
        dump = subprocess.run(["tc", "-j", "filter", "show", "dev", dev, direction],
                              capture_output=True, text=True).stdout  # fmt: skip
        for f in json.loads(dump or "[]"):
            if f.get("options", {}).get("handle") == TC_HANDLE or "dnsi_" in json.dumps(f):
                out.append(direction)
    return out


def host_veth(pod_ip: str) -> str:
    """The host side of a pod's veth, from the kernel's route (ptp) or bridge (bridge)."""
    route = subprocess.run(["ip", "-j", "route", "get", pod_ip], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    dev = json.loads(route)[0]["dev"]
    if dev != node.BRIDGE:
        return str(dev)
    neigh = json.loads(subprocess.run(["ip", "-j", "neigh", "show", pod_ip, "dev", dev],
                                      capture_output=True, text=True).stdout)  # fmt: skip
    mac = neigh[0]["lladdr"]
    fdb = json.loads(subprocess.run(["bridge", "-j", "fdb", "show", "br", dev],
                                    capture_output=True, text=True).stdout)  # fmt: skip
    return str(next(e["ifname"] for e in fdb if e.get("mac") == mac and e.get("ifname") != dev))


def test_host_network_pod_resolves_uncaptured(kube: Kube, workload: Workload) -> None:
    kube.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostnet", "namespace": NS},
        "spec": {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
                 "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": images.CLIENT,
                                 "imagePullPolicy": "IfNotPresent",
                                 "command": ["sleep", "infinity"]}]},
    }))  # fmt: skip
    kube("-n", NS, "wait", "--for=condition=Ready", "pod/hostnet", "--timeout=60s", timeout=70)
    conf = kube.exec(NS, "hostnet", "cat", "/etc/resolv.conf")
    assert f"nameserver {node.DNS_IP}" in conf
    got = kube.exec(NS, "hostnet", "getent", "ahostsv4", "kubernetes.default").split()
    assert got and got[0] == node.API_SERVICE_IP
    assert f"{NS}/hostnet" not in kube.captured()
    kube("-n", NS, "delete", "pod", "hostnet", "--wait=false")


def test_coredns_pods_are_not_captured_and_serve(kube: Kube, workload: Workload) -> None:
    pods = kube.json("-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-dns")["items"]
    assert len(pods) == 2
    captured = kube.captured()
    for pod in pods:
        assert f"kube-system/{pod['metadata']['name']}" not in captured, captured
        assert our_filters(host_veth(pod["status"]["podIP"])) == []
        # It answers, directly asked.
        name = f"kubernetes.default.svc.{node.CLUSTER_DOMAIN}"
        ip = pod["status"]["podIP"]
        out = kube.exec(NS, workload.clients[0], "dig", "+short", "+time=2", "+tries=1",
                        f"@{ip}", name)  # fmt: skip
        assert out.strip() == node.API_SERVICE_IP
    # While a client pod's veth does carry our filters.
    client = kube.json("-n", NS, "get", "pod", workload.clients[0])
    assert sorted(our_filters(host_veth(client["status"]["podIP"]))) == ["egress", "ingress"]

"""The node agent fed by a real kube-apiserver: it learns this node's pods from the watch
(field selector spec.nodeName) and follows them appearing, restarting and going away, with
the deploy/ RBAC identity.  Real BPF on the netns lab."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devlab.netns import Agent, Lab, PodSpec, stop
from tests.e2e.apiserver import Cluster
from tests.e2e.relay import start_relays

UPSTREAM = ("--host-record=web.e2e2.svc.cluster.local,10.96.99.99",)  # kube-dns's own answer


def pod(name: str, ip: str, namespace: str = "e2e2", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
    }


def run_pod(
    cluster: Cluster, name: str, ip: str, namespace: str = "e2e2", **meta: Any
) -> dict[str, Any]:
    obj = pod(name, ip, namespace, **meta)
    cluster.apply(obj)
    cluster.patch_status(obj, {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"})
    return obj


def answer(lab: Lab, pod_name: str, name: str) -> list[str]:
    r = lab.run_in_pod(pod_name, "dig", "+short", "+time=1", "+tries=1", name)
    return [ln for ln in r.stdout.splitlines() if ln and not ln.startswith(";")]


def wait(cond: Any, timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


def start_kube_agent(
    cluster: Cluster, lab: Lab, tmp_path: Path, pin: Path, *upstream: str
) -> Agent:
    """The agent on the lab's node with its Kubernetes source, as the DaemonSet's identity,
    and kube-dns's dnsmasq answering ``upstream`` records."""
    lab.start_upstream(*upstream)
    # The node namespace reaches the API server through two relays over a Unix socket.
    lab.procs.extend(start_relays(lab.node, cluster.api_port, tmp_path / "api.sock"))
    kc = cluster.kubeconfig(cluster.token_for("kube-system", "dns-interceptor"), tmp_path / "kc")
    return lab.start_agent(None, "--kubeconfig", str(kc), pin_dir=pin, ready_timeout=90)


@pytest.fixture
def node(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Lab, Agent, str]]:
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "e2e2"}})
    # No controller-manager here to create it: pods need their namespace's default account.
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": "e2e2"},
        }
    )
    svc = cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "e2e2"},
            "spec": {"ports": [{"port": 80}]},
        }
    )
    lab = Lab(
        f"dw{uuid.uuid4().hex[:5]}",
        [PodSpec("app", "10.244.1.10", "e2e2"), PodSpec("coredns", "10.244.1.11", "e2e2")],
    ).up()
    pin = Path(f"/sys/fs/bpf/{lab.prefix}")
    try:
        run_pod(cluster, "app", "10.244.1.10")
        run_pod(cluster, "coredns-x", "10.244.1.11", labels={"k8s-app": "kube-dns"})
        agent = start_kube_agent(cluster, lab, tmp_path, pin, *UPSTREAM)
        yield lab, agent, svc["spec"]["clusterIP"]
    finally:
        for name in ("app", "coredns-x", "late"):
            cluster.delete(pod(name, ""))
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)


def test_pods_from_the_watch_are_captured_and_followed(
    cluster: Cluster, node: tuple[Lab, Agent, str]
) -> None:
    lab, agent, web_ip = node
    wait(lambda: answer(lab, "app", "web.e2e2.svc.cluster.local") == [web_ip], what="captured")
    # A DNS-server pod on this node is never captured: it reaches kube-dns directly.
    assert answer(lab, "coredns", "web.e2e2.svc.cluster.local") == ["10.96.99.99"]
    # The pod restarts: new sandbox, new veth, same name and IP.
    lab.remove_pod("app")
    lab.add_pod(PodSpec("app", "10.244.1.10", "e2e2"))
    wait(lambda: answer(lab, "app", "web.e2e2.svc.cluster.local") == [web_ip], what="restart")
    # The pod goes away in the API: the agent lets go of its veth.
    cluster.delete(pod("app", ""))
    wait(
        lambda: answer(lab, "app", "web.e2e2.svc.cluster.local") == ["10.96.99.99"],
        what="released after delete",
    )
    assert agent.proc.poll() is None
    stop(agent.proc)

"""The cluster tier: tests against a real one-node Kubernetes cluster (tests/cluster/node.py)
with dns-interceptor deployed as its DaemonSet.

A cluster that is already up (``make cluster``) is used as it is and left running; otherwise
the session brings one up and removes it at the end.  Needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster import images, node


@dataclass
class Kube:
    """kubectl against the local cluster, plus the waits the tests share."""

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return node.kubectl(*args, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    def apply(self, manifest: str) -> None:
        node.run(
            node.kubectl_bin(), f"--kubeconfig={node.KUBECONFIG}", "apply", "-f", "-",
            input=manifest,
        )  # fmt: skip

    def exec(self, ns: str, pod: str, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        return self("-n", ns, "exec", pod, "--", *cmd, check=check, timeout=timeout)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
        return node.wait_for(what, check, timeout)

    def agent_pod(self) -> str:
        pods = self.json(
            "-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=dns-interceptor"
        )
        running = [
            p for p in pods["items"]
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]  # fmt: skip
        assert len(running) == 1, [p["metadata"]["name"] for p in pods["items"]]
        return str(running[0]["metadata"]["name"])

    def metrics(self) -> str:
        """The agent's /metrics through the API server's pod proxy (as Prometheus would)."""
        agent = self.agent_pod()
        return self(
            "get", "--raw", f"/api/v1/namespaces/kube-system/pods/{agent}:9253/proxy/metrics"
        )

    def captured(self) -> set[str]:
        """namespace/name of every pod the agent has attached to (its state file)."""
        state = json.loads(
            self.exec("kube-system", self.agent_pod(), "cat", "/run/dns-interceptor/state.json")
        )
        return {f"{p['namespace']}/{p['name']}" for p in state.get("pods", [])}

    def rollout(self) -> None:
        self("-n", "kube-system", "rollout", "status", "ds/dns-interceptor", "--timeout=300s",
             timeout=320)  # fmt: skip


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    if os.geteuid() != 0:
        pytest.skip("the cluster tier needs root (containerd, kubelet, BPF)")
    # A cluster someone brought up (make cluster) is theirs: used, then left running.
    was_up = node.pid_of("kube-apiserver") is not None
    t0 = time.monotonic()
    # Progress on the terminal while it builds (CoreDNS, images on a fresh machine): minutes.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        up = subprocess.run([sys.executable, "-m", "tests.cluster.node", "up"], cwd=node.ROOT)
    if up.returncode != 0:
        if not was_up:  # what a failed bring-up started is ours to remove
            subprocess.run([sys.executable, "-m", "tests.cluster.node", "down"], cwd=node.ROOT)
        pytest.fail("the cluster did not come up (its log is above)")
    print(f"cluster up in {time.monotonic() - t0:.0f} s (was {'up' if was_up else 'down'})")
    k = Kube()
    try:
        yield k
    finally:
        if not was_up and not os.environ.get("CLUSTER_KEEP"):
            subprocess.run([sys.executable, "-m", "tests.cluster.node", "down"], cwd=node.ROOT)


CLIENT = images.CLIENT


NS = "dnsi-test"
MESH_HOST = "api.mesh.example"
EXTERNAL = ("www.example.com", node.UPSTREAM_NAMES["www.example.com"])


def workload_manifest() -> str:
    """The test namespace: a Service, a ServiceEntry host (a VIP CoreDNS cannot know), a
    headless StatefulSet, and a Deployment of client pods whose resolv.conf the kubelet
    writes (ClusterFirst, ndots:5)."""
    client = {"name": "client", "image": images.CLIENT, "imagePullPolicy": "IfNotPresent",
              "command": ["sleep", "infinity"]}  # fmt: skip
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
         "spec": {"ports": [{"port": 80}], "selector": {"app": "none"}}},
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
         "metadata": {"name": "mesh-api", "namespace": NS},
         "spec": {"hosts": [MESH_HOST], "ports": [{"number": 443, "name": "https",
                                                  "protocol": "TLS"}],
                  "resolution": "DNS", "location": "MESH_EXTERNAL"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": NS},
         "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": "db", "namespace": NS},
         "spec": {"serviceName": "db", "replicas": 2, "selector": {"matchLabels": {"app": "db"}},
                  "template": {"metadata": {"labels": {"app": "db"}},
                               "spec": {"terminationGracePeriodSeconds": 1,
                                        "containers": [client]}}}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "clients", "namespace": NS},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "clients"}},
                  "template": {"metadata": {"labels": {"app": "clients"}},
                               "spec": {"terminationGracePeriodSeconds": 1,
                                        "containers": [client]}}}},
    ]  # fmt: skip
    return "\n---\n".join(json.dumps(o) for o in objs)


@dataclass
class Workload:
    kube: Kube
    clients: list[str]
    vip: str

    def ask(self, pod: str, *dig: str) -> str:
        return self.kube.exec(NS, pod, "dig", "+short", "+time=2", "+tries=1", *dig).strip()


@pytest.fixture(scope="session")
def workload(kube: Kube) -> Workload:
    kube.apply(workload_manifest())
    for kind in ("deploy/clients", "sts/db"):
        kube("-n", NS, "rollout", "status", kind, "--timeout=180s", timeout=200)
    pods = kube.json("-n", NS, "get", "pods", "-l", "app=clients")
    clients = sorted(p["metadata"]["name"] for p in pods["items"]
                     if not p["metadata"].get("deletionTimestamp"))  # fmt: skip
    vip = kube.wait(
        "the mesh host's VIP from a client pod",
        lambda: kube.exec(
            NS, clients[0], "dig", "+short", "+time=2", "+tries=1", MESH_HOST, check=False
        ).strip(),  # fmt: skip
        60,
    )
    return Workload(kube, clients, vip)


FIGURES = node.CACHE_BIN.parent / "cluster-figures.json"
"""Beside the build cache, which outlives the cluster (down removes everything else)."""


def record_figure(name: str, value: str) -> None:
    """A measured figure (for the closing note and docs), printed and kept in FIGURES."""
    print(f"FIGURE {name}: {value}")
    try:
        data = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        data = {}
    data[name] = value
    FIGURES.write_text(json.dumps(data, indent=2))

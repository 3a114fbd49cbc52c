"""A Service created, changed and deleted with kubectl is answered correctly inside a pod
within 1 s (measured from the moment kubectl returned, by the pod's own clock: the node's)."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.cluster import node
from tests.cluster.conftest import NS, Workload

NAME = f"fresh.{NS}.svc.{node.CLUSTER_DOMAIN}"
IP = "10.96.100.50"
WAIT = (
    # Ask until the full dig output contains $3; print the node clock when it does.
    'end=$(($(date +%s) + 30)); while [ "$(date +%s)" -lt "$end" ]; do '
    'if dig +time=1 +tries=1 "$1" "$2" | grep -q -- "$3"; then date +%s.%N; exit 0; fi; '
    "done; exit 1"
)


def change_then_measure(workload: Workload, qtype: str, expect: str, *kubectl: str) -> float:
    watcher = subprocess.Popen(
        [str(node.kubectl_bin()), f"--kubeconfig={node.KUBECONFIG}", "-n", NS, "exec",
         workload.clients[0], "--", "sh", "-c", WAIT, "wait", NAME, qtype, expect],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)  # the loop runs (and still sees the old answer)
    assert watcher.poll() is None, "the answer was there before the change"
    workload.kube(*kubectl)
    changed = time.time()
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    return float(out.strip()) - changed


@pytest.fixture
def clean(workload: Workload) -> Workload:
    workload.kube("-n", NS, "delete", "svc", "fresh", "--ignore-not-found")
    return workload


def test_service_create_change_delete_within_one_second(clean: Workload) -> None:
    w = clean
    create = change_then_measure(
        w, "A", f"\t{IP}", "-n", NS, "create", "service", "clusterip", "fresh",
        f"--clusterip={IP}", "--tcp=80:80",
    )  # fmt: skip
    change = change_then_measure(
        w, "SRV", " 8080 fresh.", "-n", NS, "patch", "service", "fresh", "--type=json",
        "-p", '[{"op":"add","path":"/spec/ports/-","value":{"name":"http","port":8080}}]',
    )  # fmt: skip
    delete = change_then_measure(w, "A", "status: NXDOMAIN", "-n", NS, "delete", "svc", "fresh")
    print(
        f"create {create * 1000:.0f} ms, change {change * 1000:.0f} ms, "
        f"delete {delete * 1000:.0f} ms"
    )
    assert create < 1.0 and change < 1.0 and delete < 1.0, (create, change, delete)

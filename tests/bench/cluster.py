"""Figures of the DaemonSet on the real local node (tests/cluster/node.py), printed as a table:

* the agent pod's memory (its container's cgroup working set, computed as the kubelet does:
  usage minus inactive file pages), idle and holding 1,000 extra Services;
* the time from ``kubectl apply -k deploy/local`` to the DaemonSet's pod being Ready.

    sudo .venv/bin/python -m tests.bench.cluster [--services 1000]

Brings the cluster up if it is not (and leaves it up).  Capture latency and the lookups lost
during a rollout are measured by the cluster tier (tests/cluster/test_6_churn.py,
test_7_rollout.py), which prints them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.common import positive
from tests.cluster import node

AGENTS = "app.kubernetes.io/name=dns-interceptor"
BENCH_NS = "dnsi-bench"


def kubectl(*args: str, stdin: str | None = None, timeout: float = 300) -> str:
    return node.kubectl(*args, stdin=stdin, timeout=timeout)


def agent() -> dict[str, object]:
    pods = json.loads(kubectl("-n", "kube-system", "get", "pods", "-l", AGENTS, "-o", "json"))
    live = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1
    return dict(live[0])


def working_set(pod: dict[str, object]) -> int:
    """The container's cgroup v1 working set: usage - total_inactive_file (cadvisor's rule)."""
    meta, status = pod["metadata"], pod["status"]
    uid = meta["uid"]  # type: ignore[index]
    cid = status["containerStatuses"][0]["containerID"].split("://", 1)[1]  # type: ignore[index]
    qos = status["qosClass"].lower()  # type: ignore[index]
    base = Path("/sys/fs/cgroup/memory/kubepods")
    if qos != "guaranteed":
        base = base / qos
    cg = base / f"pod{uid}" / cid
    usage = int((cg / "memory.usage_in_bytes").read_text())
    stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    return usage - int(stat["total_inactive_file"])


def settle(seconds: float) -> int:
    """The working set after ``seconds`` of quiet (the lowest of a few readings)."""
    time.sleep(seconds)
    return min(working_set(agent()) for _ in range(3) if time.sleep(0.5) is None)


def apply_to_ready() -> float:
    local = str(node.ROOT / "deploy" / "local")
    kubectl("delete", "-k", local, "--ignore-not-found", "--wait=true")
    deadline = time.monotonic() + 120
    while json.loads(kubectl("-n", "kube-system", "get", "pods", "-l", AGENTS, "-o", "json"))[
        "items"
    ]:
        if time.monotonic() > deadline:
            raise RuntimeError("the agent pod did not go")
        time.sleep(0.5)
    t0 = time.monotonic()
    kubectl("apply", "-k", local)
    while True:
        pods = json.loads(kubectl("-n", "kube-system", "get", "pods", "-l", AGENTS, "-o", "json"))
        for p in pods["items"]:
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            if conds.get("Ready") == "True":
                return time.monotonic() - t0
        if time.monotonic() - t0 > 300:
            raise RuntimeError("the agent pod did not become Ready")
        time.sleep(0.2)


def services(n: int) -> str:
    items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": BENCH_NS}}]
    for i in range(n):
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{i}", "namespace": BENCH_NS},
                "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": f"a{i}"}},
            }
        )
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=positive, default=1000)
    args = p.parse_args(argv)
    subprocess.run([sys.executable, "-m", "tests.cluster.node", "up"], check=True)
    ready = apply_to_ready()
    idle = settle(20)
    kubectl("apply", "--server-side", "-f", "-", stdin=services(args.services), timeout=600)
    name = f"svc-{args.services - 1}.{BENCH_NS}.svc.{node.CLUSTER_DOMAIN}"
    a = agent()["metadata"]["name"]  # type: ignore[index]
    deadline = time.monotonic() + 120
    while "NOERROR" not in kubectl(
        "-n", "kube-system", "exec", str(a), "--", "dig", "@169.254.20.10", "+time=2", name
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent never answered {name}")
        time.sleep(1)
    loaded = settle(20)
    kubectl("delete", "namespace", BENCH_NS, "--wait=false")
    rows = [
        ("kubectl apply -k to Ready", f"{ready:.1f} s"),
        ("agent working set, idle", f"{idle / 2**20:.1f} MiB"),
        (f"agent working set, +{args.services} Services", f"{loaded / 2**20:.1f} MiB"),
        ("per Service", f"{(loaded - idle) / args.services / 1024:.2f} KiB"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

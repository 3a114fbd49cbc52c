"""Benchmark: the agent process's memory (VmRSS) on the netns node, with N services.

The whole process is measured, as CoreDNS's formula measures it: the interpreter, every
module loaded and the service map.  The agent builds its BPF programs in a short-lived
child, so bcc and LLVM are not in it; the table says so by checking the process's mappings.

Run as root from the repository root: ``.venv/bin/python -m tests.bench.agent_rss``
(``make bench``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from devlab.netns import sh
from tests.bench.common import positive, service_manifest, table
from tests.fuzzing import rss_kib
from tests.lab.conftest import make_node

COREDNS_KB_PER_OBJECT = 0.86
COREDNS_BASE_MB = 49.0


def measure(services: int, settle: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        for node in make_node("ptp", Path(tmp)):
            items = [service_manifest(i, "bench") for i in range(services)]
            with node.source.open("a") as f:
                f.write(yaml.safe_dump(items, sort_keys=False))
            node.start_agent()
            for i in range(20):  # the resolver's paths warmed, as in service
                node.dig("client1", f"svc-{i % services}.bench.svc.cluster.local")
            time.sleep(settle)
            pid = node.agent_pid()
            maps = Path(f"/proc/{pid}/maps").read_text()
            return {
                "services": services,
                "rss_mib": rss_kib(pid) / 1024,
                "hwm_mib": rss_kib(pid, "VmHWM") / 1024,
                "llvm": any(x in maps for x in ("libbcc", "libLLVM", "libclang")),
            }
    raise RuntimeError("no node")


NAMESPACES = 100
NODE_PODS = 110
"""Pods on the agent's node (kubelet's default maximum): the agent watches only those."""


def populate(cluster: Any, services: int, pods: int) -> None:
    """``services`` ClusterIP Services in 100 namespaces, each with an EndpointSlice of
    pods/services ready addresses, and ``pods`` Pods: the first NODE_PODS on node-1 (the
    agent's), the rest on 100 other nodes.  One POST each, 16 at a time."""
    from tests.e2e.apiserver import collection_path

    per = max(1, pods // services)

    def ns(i: int) -> str:
        return f"ns{i % NAMESPACES}"

    def pod_ip(i: int) -> str:
        return f"10.{128 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"

    def post(obj: dict[str, Any]) -> None:
        cluster.raw("POST", collection_path(obj), obj)

    for n in range(NAMESPACES):
        post({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns(n)}})
        sa = {"apiVersion": "v1", "kind": "ServiceAccount"}
        post({**sa, "metadata": {"name": "default", "namespace": ns(n)}})
    objects: list[dict[str, Any]] = []
    for i in range(services):
        svc = service_manifest(i, ns(i))
        del svc["spec"]["clusterIP"]  # the API server allocates (10.96.0.1 is kubernetes')
        objects.append(svc)
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"svc-{i}-x",
                    "namespace": ns(i),
                    "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": [pod_ip(i * per + j)], "conditions": {"ready": True}}
                    for j in range(per)
                ],
            }
        )
    for i in range(pods):
        node = "node-1" if i < NODE_PODS else f"node-{2 + i % 100}"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"pod-{i}", "namespace": ns(i)},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            }
        )
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(post, objects))


def measure_kube(services: int, pods: int, settle: float) -> dict[str, object]:
    """The agent with its default Kubernetes source (this node's pods only) against the e2e
    kube-apiserver holding the whole cluster, reached from the netns node over a relay."""
    from devlab.netns import Lab, PodSpec
    from tests.e2e.apiserver import Cluster
    from tests.e2e.relay import start_relays
    from tests.helpers import ROOT

    with tempfile.TemporaryDirectory(prefix="bench-rss-kube-") as tmp:
        cluster = Cluster(Path(tmp) / "kube").start()
        lab = None
        pin = Path("/sys/fs/bpf/bench-rss-kube")
        try:
            cluster.apply_file(ROOT / "deploy" / "base" / "rbac.yaml")
            t0 = time.monotonic()
            populate(cluster, services, pods)
            print(f"populated the API server in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            lab = Lab(f"br{os.getpid() % 10000}", [PodSpec("client1", "10.244.1.10", "ns0")])
            lab.up()
            lab.start_upstream()
            lab.procs.extend(start_relays(lab.node, cluster.api_port, Path(tmp) / "api.sock"))
            kc = cluster.kubeconfig(
                cluster.token_for("kube-system", "dns-interceptor"), Path(tmp) / "kc"
            )
            t0 = time.monotonic()
            agent = lab.start_agent(None, "--kubeconfig", str(kc), pin_dir=pin, ready_timeout=300)
            ready = time.monotonic() - t0
            time.sleep(settle)
            kids = sh("pgrep", "-P", str(agent.proc.pid), check=False).stdout.split()
            pid = int(kids[0]) if kids else agent.proc.pid  # nsenter may exec the agent
            return {
                "services": services,
                "pods": pods,
                "ready_s": ready,
                "rss_mib": rss_kib(pid) / 1024,
                "hwm_mib": rss_kib(pid, "VmHWM") / 1024,
            }
        finally:
            if lab is not None:
                lab.down()
            shutil.rmtree(pin, ignore_errors=True)
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.agent_rss", description=__doc__)
    p.add_argument("--services", type=positive, nargs="+", default=[1000])
    p.add_argument("--settle", type=float, default=3.0, help="seconds after the queries")
    p.add_argument(
        "--kube",
        default="10000:50000",
        help="SERVICES:PODS in a real kube-apiserver for the agent's Kubernetes source "
        "('' to skip)",
    )
    args = p.parse_args(argv)
    rows = []
    for n in args.services:
        r = measure(n, args.settle)
        formula = n * COREDNS_KB_PER_OBJECT / 1024 + COREDNS_BASE_MB / 1.048576
        rows.append(
            [
                f"{n:,}",
                f"{r['rss_mib']:.1f} MiB",
                f"{r['hwm_mib']:.1f} MiB",
                f"{formula:.1f} MiB",
                "yes" if r["llvm"] else "no",
            ]
        )
    print("Agent process memory on the netns node (file source, fast path on):")
    print(
        table(
            ["services", "RSS", "peak RSS", "CoreDNS formula", "bcc/LLVM mapped"],
            rows,
        )
    )
    print("target: RSS <= 80 MiB with 1,000 services (issue 14)")
    if args.kube:
        services, pods = (int(x) for x in args.kube.split(":"))
        r = measure_kube(services, pods, args.settle)
        formula_mb = (services + pods) * 0.000858 + 49.1
        rss_mb = float(r["rss_mib"]) * 1.048576  # type: ignore[arg-type]
        print(
            f"\nAgent with the Kubernetes source (default: this node's {NODE_PODS} pods "
            "watched), the e2e kube-apiserver holding the cluster:"
        )
        print(
            table(
                ["services", "pods", "ready after", "RSS", "peak RSS", "CoreDNS formula", "ratio"],
                [
                    [
                        f"{services:,}",
                        f"{pods:,}",
                        f"{r['ready_s']:.0f} s",
                        f"{r['rss_mib']:.1f} MiB",
                        f"{r['hwm_mib']:.1f} MiB",
                        f"{formula_mb:.1f} MB",
                        f"{rss_mb / formula_mb:.2f}x",
                    ]
                ],
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

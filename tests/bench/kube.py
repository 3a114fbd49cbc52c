"""Kubernetes source figures: memory of the service map for a large cluster, and freshness
(API change accepted -> changed answer served), the way CoreDNS reports
dns_programming_duration.  Needs root for the real kube-apiserver (freshness part).

    .venv/bin/python -m tests.bench.kube [--changes 100] [--skip-freshness]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

SERVICES, ENDPOINTS_PER_SERVICE, PODS = 10_000, 5, 50_000
NODE_PODS = 110  # kubelet's default max-pods: what one agent watches by default

MEMORY_CHILD = r"""
import gc, json, sys, tracemalloc
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import PodRecords, ZoneSettings
from interceptor.sources.kube import decode

services, per, pods, verified = (int(a) for a in sys.argv[1:5])

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def ip(n):
    return f"10.244.{n // 250 % 256}.{n % 250 + 1}"

def raw_objects():
    for i in range(services):
        ns = f"ns{i % 100}"
        yield "Service", "v1", {"metadata": {"name": f"svc-{i}", "namespace": ns},
            "spec": {"clusterIP": f"10.{96 + i // 65000}.{i // 250 % 256}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
        yield "EndpointSlice", "discovery.k8s.io/v1", {
            "metadata": {"name": f"svc-{i}-abc", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip(i * per + j)], "conditions": {"ready": True}}
                          for j in range(per)]}
    for i in range(pods):
        yield "Pod", "v1", {"metadata": {"name": f"pod-{i}", "namespace": f"ns{i % 100}",
                                         "labels": {"app": f"svc-{i % services}"}},
            "spec": {"nodeName": f"node-{i % 100}"},
            "status": {"podIP": f"10.245.{i // 250 % 256}.{i % 250 + 1}",
                       "podIPs": [{"ip": f"10.245.{i // 250 % 256}.{i % 250 + 1}"}]}}

mode = PodRecords.VERIFIED if verified else PodRecords.INSECURE
gc.collect(); base = rss()
t0 = __import__("time").monotonic()
m = ServiceMap(ZoneSettings(pod_records=mode))
for kind, api, raw in raw_objects():
    m.upsert(decode(kind, api, raw))
build = __import__("time").monotonic() - t0
gc.collect()
print(json.dumps({"rss_mb": (rss() - base) / 2**20, "answers": len(m.answers),
                  "build_s": round(build, 1)}))
"""


def memory(pods: int, verified: bool) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_CHILD,
            str(SERVICES),
            str(ENDPOINTS_PER_SERVICE),
            str(pods),
            str(int(verified)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def freshness(changes: int) -> list[float]:
    from devlab.netns import stop
    from tests.e2e.apiserver import Cluster
    from tests.helpers import ROOT, start_serve

    tmp = Path(tempfile.mkdtemp(prefix="bench-kube-"))
    cluster = Cluster(tmp).start()
    served = None
    try:
        cluster.apply_file(ROOT / "deploy" / "base" / "rbac.yaml")
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fresh"}})
        kc = cluster.kubeconfig(cluster.token_for("kube-system", "dns-interceptor"), tmp / "kc")
        served = start_serve("--kubeconfig", str(kc), "--upstream", "127.0.0.1:9", source=None)
        while "service map loaded" not in "\n".join(served.log):
            time.sleep(0.05)
        samples: list[float] = []
        for i in range(changes):
            kind = ("create", "update", "delete")[i % 3]
            svc_name = f"s{i - i % 3}"
            name = f"{svc_name}.fresh.svc.cluster.local"
            obj = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": svc_name, "namespace": "fresh"},
                "spec": {"ports": [{"name": "p", "port": 1000 + i}]},
            }
            if kind == "create":
                cluster.apply(obj)
                changed = partial(_rcode_is, served.port, name, "NOERROR")
            elif kind == "update":
                current = cluster.raw("GET", f"/api/v1/namespaces/fresh/services/{svc_name}")
                obj["spec"]["clusterIP"] = current["spec"]["clusterIP"]
                cluster.apply(obj)
                changed = partial(_srv_port_is, served.port, f"_p._tcp.{name}", 1000 + i)
            else:
                cluster.delete(obj)
                changed = partial(_rcode_is, served.port, name, "NXDOMAIN")
            t0 = time.monotonic()  # the API server has accepted the change
            while not changed():
                if time.monotonic() - t0 > 10:
                    raise SystemExit(f"change {i} ({kind}) not served after 10 s")
            samples.append(time.monotonic() - t0)
        return samples
    finally:
        if served is not None:
            stop(served.proc)
        cluster.stop()


def _ask(port: int, name: str, rtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rtype), "127.0.0.1", port=port, timeout=2)


def _rcode_is(port: int, name: str, rcode: str) -> bool:
    return bool(dns.rcode.to_text(_ask(port, name, "A").rcode()) == rcode)


def _srv_port_is(port: int, name: str, want: int) -> bool:
    m = _ask(port, name, "SRV")
    return next((r.port for rr in m.answer for r in rr), None) == want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--skip-freshness", action="store_true")
    args = ap.parse_args()
    coredns = (PODS + SERVICES) * 0.000858 + 49.1
    print(
        f"Service map memory: {SERVICES:,} services, {SERVICES * ENDPOINTS_PER_SERVICE:,} "
        f"endpoints, {PODS:,} pods (built through the watch decoder; RSS growth)"
    )
    for pods, verified, label in (
        (NODE_PODS, False, f"agent default: this node's {NODE_PODS} pods"),
        (PODS, False, f"every pod watched ({PODS:,})"),
        (PODS, True, f"every pod, --pod-records verified ({PODS:,})"),
    ):
        m = memory(pods, verified)
        print(
            f"  {label:44} {m['rss_mb']:7.1f} MB  {m['answers']:>9,} answers  "
            f"built in {m['build_s']} s"
        )
    print(f"  CoreDNS formula (Pods+Services)*0.000858+49.1 = {coredns:.1f} MB")
    if args.skip_freshness:
        return
    samples = freshness(args.changes)
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * len(ms))) - 1)]
    print(
        f"\nFreshness over {len(ms)} changes (create/update/delete of a Service, from the API "
        "server accepting it to the changed answer served):"
    )
    print(f"  p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    main()

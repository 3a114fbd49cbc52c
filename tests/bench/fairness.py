"""Fairness: a quiet pod's latency while its neighbour floods (root; the netns lab node).

``python -m tests.bench.fairness [--flood-qps 25000] [--seconds 6]``

Two pods on the lab node.  The quiet one asks one name at a time (200 a second) and records
each answer's latency; the noisy one floods the same DNS server open-loop with dnsperf
(``-Q``), half SRV questions the resolver answers in userspace, half search-path junk.  For
each kind of name the quiet pod asks (answered in the kernel, answered in userspace (SRV),
a cached forwarded name), the table shows its p50 and p99 idle and under the flood, and
what it lost; then the same with no agent, the pods asking kube-dns (the lab's dnsmasq)
directly.  The agent runs with its default per-pod budgets: they are what is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devlab.netns import DNS_IP, Lab, PodSpec, stop
from tests.bench.common import require_tool, table
from tests.bench.nodelocal import percentile

PROBE = r"""
import json, socket, struct, sys, time
name, qtype, count, rate, server = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(
    sys.argv[4]), sys.argv[5]
qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
lat, lost = [], 0
t0 = time.monotonic()
for i in range(count):
    head = struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
    q = head + qname + struct.pack("!HH", qtype, 1)
    sent = time.perf_counter()
    s.sendto(q, (server, 53))
    try:
        while True:
            r = s.recv(4096)
            if r[:2] == q[:2]:
                break
        lat.append(time.perf_counter() - sent)
    except socket.timeout:
        lost += 1
    wait = t0 + (i + 1) / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
print(json.dumps({"lat": lat, "lost": lost}))
"""

SOURCE = """apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: ns1}}
- apiVersion: v1
  kind: Service
  metadata: {name: svc1, namespace: ns1}
  spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: quiet, namespace: ns1}
  spec: {nodeName: node-1}
  status: {podIPs: [{ip: 10.244.1.10}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: noisy, namespace: ns1}
  spec: {nodeName: node-1}
  status: {podIPs: [{ip: 10.244.1.11}]}
"""

NAMES = {
    "kernel (svc A)": ("svc1.ns1.svc.cluster.local", 1),
    "userspace (SRV)": ("_http._tcp.svc1.ns1.svc.cluster.local", 33),
    "cached forwarded (A)": ("www.ext.test", 1),
}


def probe(lab: Lab, name: str, qtype: int, count: int, rate: float) -> tuple[list[float], int]:
    r = lab.run_in_pod(
        "quiet", sys.executable, "-c", PROBE, name, str(qtype), str(count), str(rate), DNS_IP,
        timeout=count / rate + 60,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    out = json.loads(r.stdout)
    return sorted(out["lat"]), int(out["lost"])


def flood(lab: Lab, tmp: Path, qps: int, seconds: float) -> subprocess.Popen[bytes]:
    names = tmp / "flood.txt"
    lines = []
    for i in range(2000):
        lines.append("_http._tcp.svc1.ns1.svc.cluster.local SRV")
        lines.append(f"junk{i}.example.com.ns1.svc.cluster.local A")
    names.write_text("\n".join(lines) + "\n")
    dnsperf = require_tool("dnsperf")
    # -q: enough outstanding queries that the flood stays open-loop while the kernel drops
    # most of it (too few, and dnsperf stalls until its timeouts free them, then bursts).
    cmd = ["ip", "netns", "exec", lab.pod_ns("noisy"), dnsperf, "-s", DNS_IP, "-d", str(names),
           "-Q", str(qps), "-l", str(seconds), "-c", "8", "-q", str(2 * qps),
           "-t", "1"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(
    lab: Lab, tmp: Path, flood_qps: int, seconds: float, rate: float
) -> list[tuple[str, str, float, float, int]]:
    """(name kind, idle|flood, p50 ms, p99 ms, lost) for each kind of name."""
    count = int(seconds * rate)
    out = []
    for kind, (name, qtype) in NAMES.items():
        probe(lab, name, qtype, 20, 50)  # warm: caches, flows
        lat, lost = probe(lab, name, qtype, count, rate)
        out.append((kind, "idle", percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, lost))
        noisy = flood(lab, tmp, flood_qps, seconds + 2)
        time.sleep(1.0)  # the flood at full rate before measuring
        lat, lost = probe(lab, name, qtype, count, rate)
        noisy.wait(timeout=seconds + 30)
        out.append((kind, "flood", percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, lost))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.fairness", description=__doc__)
    p.add_argument("--flood-qps", type=int, default=25000)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--rate", type=float, default=200, help="the quiet pod's queries a second")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fairness-"))
    lab = Lab(
        "fair", [PodSpec("quiet", "10.244.1.10", "ns1"), PodSpec("noisy", "10.244.1.11", "ns1")]
    )
    lab.up()
    rows = []
    try:
        lab.start_upstream(
            "--local-ttl=300",
            "--host-record=www.ext.test,192.0.2.80",
            "--host-record=svc1.ns1.svc.cluster.local,10.96.99.99",
            "--srv-host=_http._tcp.svc1.ns1.svc.cluster.local,svc1.ns1.svc.cluster.local,80",
        )
        source = tmp / "cluster.yaml"
        source.write_text(SOURCE)
        pin = Path("/sys/fs/bpf/fair-bench")
        shutil.rmtree(pin, ignore_errors=True)
        agent = lab.start_agent(source, "--early-capture=0", pin_dir=pin)
        try:
            for kind, phase, p50, p99, lost in measure(
                lab, tmp, args.flood_qps, args.seconds, args.rate
            ):
                rows.append(("interceptor", kind, phase, p50, p99, lost))
        finally:
            stop(agent.proc)
            shutil.rmtree(pin, ignore_errors=True)
        for kind, phase, p50, p99, lost in measure(
            lab, tmp, args.flood_qps, args.seconds, args.rate
        ):
            rows.append(("kube-dns only", kind, phase, p50, p99, lost))
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    idle = {(s, k): p99 for s, k, ph, _, p99, _ in rows if ph == "idle"}
    printed = [
        (s, k, ph, f"{p50:.3f}", f"{p99:.3f}",
         f"{p99 / idle[(s, k)]:.2f}x" if ph == "flood" and idle[(s, k)] else "", str(lost))
        for s, k, ph, p50, p99, lost in rows
    ]  # fmt: skip
    print(f"quiet pod at {args.rate:g} q/s; neighbour flooding {args.flood_qps} q/s open-loop "
          f"(SRV and junk), {args.seconds:g} s each")  # fmt: skip
    print(table(["server", "quiet pod asks", "neighbour", "p50 ms", "p99 ms",
                 "p99 vs idle", "lost"], printed))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

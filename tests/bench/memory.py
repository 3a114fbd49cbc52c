"""Issue 14 part 4: the whole resolver process's memory and start-up at cluster scale, against
CoreDNS's published formula, (Pods+Services) x 0.86 KB + 49 MB.

    .venv/bin/python -m tests.bench.memory [--scales 10000:50000,100000:0]

For each scale SERVICES:PODS a YAML file is generated (a ``v1/List``): SERVICES ClusterIP
Services in 100 namespaces, each with one named port and, when PODS > 0, an EndpointSlice
holding PODS/SERVICES ready pod addresses.  ``interceptor serve --source FILE`` is started on
loopback and asked for the last service's name every 50 ms until it answers (the first
answer: the map is complete).  Figures: seconds to the first answer, the process's RSS then
and after 5 s more (VmRSS: everything loaded counts), its peak (VmHWM), and the bytes per
service above the process's RSS with an empty file.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzzing import rss_kib
from tests.helpers import ROOT

NAMESPACES = 100


def write_cluster(path: Path, services: int, pods: int) -> None:
    """A kubectl-style List, written as YAML flow lines (fast to write, same to the loader)."""
    per = pods // services if services else 0
    with path.open("w") as f:
        f.write("apiVersion: v1\nkind: List\nitems:\n")
        for n in range(NAMESPACES):
            f.write(f"- {{apiVersion: v1, kind: Namespace, metadata: {{name: ns{n}}}}}\n")
        for i in range(services):
            ns = f"ns{i % NAMESPACES}"
            ip = f"10.{96 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
            f.write(
                f"- {{apiVersion: v1, kind: Service, metadata: {{name: svc-{i}, namespace: {ns}}},"
                f" spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}}}\n"
            )
            if per:
                eps = ", ".join(
                    f"{{addresses: [10.{128 + (i * per + j) // 62500}.{(i * per + j) // 250 % 250}."
                    f"{(i * per + j) % 250 + 1}], conditions: {{ready: true}}}}"
                    for j in range(per)
                )
                f.write(
                    "- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: "
                    f"{{name: svc-{i}-x, namespace: {ns}, labels: "
                    f"{{kubernetes.io/service-name: svc-{i}}}}}, addressType: IPv4, "
                    f"ports: [{{name: http, port: 8080, protocol: TCP}}], endpoints: [{eps}]}}\n"
                )


def ask(port: int, name: str) -> bool:
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.05)
        s.sendto(q, ("127.0.0.1", port))
        try:
            reply = s.recv(512)
        except OSError:
            return False
    return len(reply) > 12 and reply[3] & 0xF == 0 and reply[7] > 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(path: Path, services: int, timeout: float) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "interceptor", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--source", str(path), "--upstream", "127.0.0.1:9"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        last = f"svc-{services - 1}.ns{(services - 1) % NAMESPACES}.svc.cluster.local"
        probe = last if services else "kubernetes.default.svc.cluster.local"
        while not ask(port, probe):
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}")
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"no answer within {timeout:g} s")
            if not services:
                break
            time.sleep(0.05)
        first = time.monotonic() - t0
        rss_first = rss_kib(proc.pid)
        time.sleep(5)
        return {
            "first_s": first,
            "rss_mb": rss_first / 1024,
            "rss_settled_mb": rss_kib(proc.pid) / 1024,
            "hwm_mb": rss_kib(proc.pid, "VmHWM") / 1024,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="10000:50000,100000:0", help="SERVICES:PODS,...")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    scales = [tuple(int(x) for x in s.split(":")) for s in args.scales.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        empty = Path(tmp) / "empty.yaml"
        write_cluster(empty, 0, 0)
        base = measure(empty, 0, args.timeout)
        print(
            "| services | pods (endpoints) | first answer | RSS | RSS +5 s | peak | "
            "CoreDNS formula | RSS / formula | bytes per service |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| 0 | 0 | - | {base['rss_mb']:.1f} MiB | {base['rss_settled_mb']:.1f} MiB | "
            f"{base['hwm_mb']:.1f} MiB | 49.1 MB | - | - |"
        )
        for services, pods in scales:
            path = Path(tmp) / f"c{services}.yaml"
            write_cluster(path, services, pods)
            m = measure(path, services, args.timeout)
            formula = (services + pods) * 0.000858 + 49.1  # MB
            rss_mb = m["rss_settled_mb"] * 1.048576  # MiB -> MB
            per = (m["rss_settled_mb"] - base["rss_settled_mb"]) * 2**20 / services
            print(
                f"| {services:,} | {pods:,} | {m['first_s']:.1f} s | {m['rss_mb']:.1f} MiB | "
                f"{m['rss_settled_mb']:.1f} MiB | {m['hwm_mb']:.1f} MiB | {formula:.1f} MB | "
                f"{rss_mb / formula:.2f}x | {per:,.0f} |"
            )


if __name__ == "__main__":
    main()

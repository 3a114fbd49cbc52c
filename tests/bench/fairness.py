"""Fairness: a quiet pod's latency while its neighbour floods (root; the netns lab node).

``python -m tests.bench.fairness [--flood-qps 25000] [--seconds 6] [--connections 5000]``

Two pods on the lab node.  The quiet one asks one name at a time (200 a second) and records
each answer's latency.  The noisy one either floods the same DNS server open-loop with dnsperf
(``-Q``): a third SRV questions the resolver answers in userspace, a third search-path junk
whose upstream refuses it (a cache miss every time), a third unique names behind a slow
upstream (20 ms); or it holds ``--connections`` TCP connections to it.  For each kind of name
the quiet pod asks (answered in the kernel; in userspace (SRV); a cached forwarded name; a
cache miss behind the slow upstream; SRV over TCP, a connection per query, while the
neighbour holds its connections) the table shows p50 and p99 idle and beside the neighbour,
and what was lost; then the same with no agent, the pods asking kube-dns (the lab's dnsmasq)
directly.  The agent runs with its default per-pod budgets: they are what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from devlab.netns import DNS_IP, Lab, PodSpec, stop
from tests.bench.common import require_tool, table
from tests.bench.nodelocal import percentile

PROBE = r"""
import json, socket, struct, sys, time
name, qtype, count, rate, server, proto = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
    float(sys.argv[4]), sys.argv[5], sys.argv[6])

def wire(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"

def udp(q):
    s.sendto(q, (server, 53))
    while True:
        r = s.recv(4096)
        if r[:2] == q[:2]:
            return

def tcp(q):
    with socket.create_connection((server, 53), timeout=2.0) as c:
        c.sendall(struct.pack("!H", len(q)) + q)
        got = b""
        while len(got) < 2 or len(got) < 2 + struct.unpack("!H", got[:2])[0]:
            more = c.recv(4096)
            if not more:
                raise socket.timeout("closed")
            got += more

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
ask = tcp if proto == "tcp" else udp
lat, lost = [], 0
t0 = time.monotonic()
stamp = int(time.time() * 1000) % 1000000
give_up = t0 + count / rate * 2 + 5
for i in range(count):
    if time.monotonic() > give_up:  # a server that takes seconds per answer: the rest lost
        lost += count - i
        break
    head = struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
    q = head + wire(name.replace("{i}", f"{stamp}-{i}")) + struct.pack("!HH", qtype, 1)
    sent = time.perf_counter()
    try:
        ask(q)
        lat.append(time.perf_counter() - sent)
    except OSError:
        lost += 1
    wait = t0 + (i + 1) / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
print(json.dumps({"lat": lat, "lost": lost}))
"""

SLOW_UPSTREAM = r"""
import asyncio, socket, struct, sys
host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

class Slow(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.t = transport
    def datagram_received(self, data, addr):
        asyncio.get_running_loop().call_later(delay, self.answer, data, addr)
    def answer(self, data, addr):
        end = data.index(0, 12) + 5
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([192, 0, 2, 7])
        self.t.sendto(data[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
                      + data[12:end] + rr, addr)

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Slow, local_addr=(host, port))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

HOLD = r"""
import resource, select, socket, sys, time
server, n = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
held = []
for _ in range(n):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setblocking(False)
    c.connect_ex((server, 53))  # the kernel keeps retrying a dropped SYN on its own
    held.append(c)
print("holding", flush=True)
sys.stdin.readline()
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

SLOW_PORT = 5300
SLOW_DELAY = 0.020


class Kind(NamedTuple):
    name: str
    """``{i}`` becomes a per-query label: a cache miss every time."""
    qtype: int
    proto: str
    neighbour: str
    """``flood`` (UDP, open-loop) or ``hold`` (TCP connections)."""
    rate: float = 0
    """Queries a second when not ``--rate``: the probe asks one at a time, so a 20 ms
    answer allows fewer."""


KINDS = {
    "kernel (svc A)": Kind("svc1.ns1.svc.cluster.local", 1, "udp", "flood"),
    "userspace (SRV)": Kind("_http._tcp.svc1.ns1.svc.cluster.local", 33, "udp", "flood"),
    "cached forwarded (A)": Kind("www.ext.test", 1, "udp", "flood"),
    "miss, slow upstream (A)": Kind("q{i}.slow.test", 1, "udp", "flood", 25),
    "SRV over TCP": Kind("_http._tcp.svc1.ns1.svc.cluster.local", 33, "tcp", "hold"),
}


def probe(lab: Lab, kind: Kind, count: int, rate: float) -> tuple[list[float], int]:
    r = lab.run_in_pod(
        "quiet", sys.executable, "-c", PROBE, kind.name, str(kind.qtype), str(count), str(rate),
        DNS_IP, kind.proto, timeout=count / rate * 3 + 60,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    out = json.loads(r.stdout)
    lost = int(out["lost"])
    # A lost query counts as never answered: it is in the percentiles, at infinity.
    return sorted(out["lat"] + [math.inf] * lost), lost


def flood(lab: Lab, tmp: Path, qps: int, seconds: float) -> subprocess.Popen[bytes]:
    names = tmp / "flood.txt"
    lines = []
    for i in range(20000):
        lines.append("_http._tcp.svc1.ns1.svc.cluster.local SRV")
        lines.append(f"junk{i}.example.com.ns1.svc.cluster.local A")
        lines.append(f"f{i}.slow.test A")
    names.write_text("\n".join(lines) + "\n")
    dnsperf = require_tool("dnsperf")
    # -q: enough outstanding queries that the flood stays open-loop while the kernel drops
    # most of it (too few, and dnsperf stalls until its timeouts free them, then bursts).
    cmd = ["ip", "netns", "exec", lab.pod_ns("noisy"), dnsperf, "-s", DNS_IP, "-d", str(names),
           "-Q", str(qps), "-l", str(seconds), "-c", "8", "-q", str(2 * qps),
           "-t", "1"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hold(lab: Lab, connections: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.pod_ns("noisy"), sys.executable, "-c", HOLD, DNS_IP,
         str(connections)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "holding":
        raise RuntimeError("the connection holder did not start")
    return proc


def measure(
    lab: Lab, tmp: Path, flood_qps: int, seconds: float, rate: float, connections: int
) -> list[tuple[str, str, float, float, int]]:
    """(name kind, idle|neighbour, p50 ms, p99 ms, lost) for each kind of name."""
    out = []
    for label, kind in KINDS.items():
        kind_rate = kind.rate or rate
        count = int(seconds * kind_rate)
        probe(lab, kind, 20, 50)  # warm: caches, flows
        lat, lost = probe(lab, kind, count, kind_rate)
        out.append((label, "idle", percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, lost))
        if kind.neighbour == "flood":
            noisy = flood(lab, tmp, flood_qps, seconds + 2)
            time.sleep(1.0)  # the flood at full rate before measuring
            lat, lost = probe(lab, kind, count, kind_rate)
            noisy.wait(timeout=seconds + 30)
            phase = f"floods {flood_qps // 1000}k q/s"
        else:
            holder = hold(lab, connections)
            time.sleep(1.0)
            try:
                lat, lost = probe(lab, kind, count, kind_rate)
            finally:
                assert holder.stdin is not None
                holder.stdin.write("\n")
                holder.stdin.close()
                holder.wait(timeout=30)
            phase = f"holds {connections} TCP"
        out.append((label, phase, percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, lost))
        print("  measured:", *out[-2], "/", *out[-1], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.fairness", description=__doc__)
    p.add_argument("--flood-qps", type=int, default=25000)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--rate", type=float, default=200, help="the quiet pod's queries a second")
    p.add_argument("--connections", type=int, default=5000, help="TCP connections held")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fairness-"))
    lab = Lab(
        "fair", [PodSpec("quiet", "10.244.1.10", "ns1"), PodSpec("noisy", "10.244.1.11", "ns1")]
    )
    lab.up()
    rows = []
    try:
        slow = subprocess.Popen(
            ["ip", "netns", "exec", lab.dns, sys.executable, "-c", SLOW_UPSTREAM, DNS_IP,
             str(SLOW_PORT), str(SLOW_DELAY)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        lab.procs.append(slow)
        assert slow.stdout is not None and slow.stdout.readline().strip() == "ready"
        lab.start_upstream(
            "--local-ttl=300",
            "--dns-forward-max=10000",
            f"--server=/slow.test/{DNS_IP}#{SLOW_PORT}",
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
                lab, tmp, args.flood_qps, args.seconds, args.rate, args.connections
            ):
                rows.append(("interceptor", kind, phase, p50, p99, lost))
        finally:
            stop(agent.proc)
            shutil.rmtree(pin, ignore_errors=True)
        for kind, phase, p50, p99, lost in measure(
            lab, tmp, args.flood_qps, args.seconds, args.rate, args.connections
        ):
            rows.append(("kube-dns only", kind, phase, p50, p99, lost))
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    idle = {(s, k): p99 for s, k, ph, _, p99, _ in rows if ph == "idle"}
    printed = [
        (s, k, ph, _ms(p50), _ms(p99),
         f"{p99 / idle[(s, k)]:.2f}x" if ph != "idle" and idle[(s, k)] else "", str(lost))
        for s, k, ph, p50, p99, lost in rows
    ]  # fmt: skip
    print(f"quiet pod at {args.rate:g} q/s, {args.seconds:g} s per row; the neighbour floods "
          f"open-loop (SRV, junk, slow-upstream misses) or holds TCP connections")  # fmt: skip
    print(table(["server", "quiet pod asks", "neighbour", "p50 ms", "p99 ms",
                 "p99 vs idle", "lost"], printed))  # fmt: skip
    return 0


def _ms(v: float) -> str:
    return "lost" if math.isinf(v) else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())

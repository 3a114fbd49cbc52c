"""The full fuzz run: ``python -m tests.bench.fuzz [--packets 1000000] [--only bpf|serve]``.

Mutated and random DNS messages (tests/fuzzing.py) over UDP and TCP, IPv4 and IPv6, along
two paths, ``--packets`` along each:

- **bpf**: from a pod on the lab node through the BPF path to the captured kube-dns address,
  with the agent running (so the kernel's fast path, the resolver, and kube-dns on every
  path the programs pass untouched all answer some of it);
- **serve**: straight at a real ``interceptor serve``.

A table of what came back: replies, replies dnspython's strict parser rejects (must be 0),
valid queries among the fuzz answered wrongly (must be 0), the server's RSS from warm to end,
and whether it still runs.  Every rejected reply through the BPF path is then replayed, alone,
with the programs' counters read around it, which says whose it is: the kernel's (a fast-path
hit), the resolver's (steered) or kube-dns's (passed untouched).  The agent runs without
per-pod budgets here (they would drop most of the fuzz before anything parsed it).  The
process tier runs the serve path with 20,000 packets, the lab tier the BPF path with 4,000.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devlab.netns import DNS_IP, DNS_IP6, Lab, PodSpec, stop
from interceptor.ops.counters import CounterReader
from interceptor.ops.state import read_state
from tests.bench.common import table
from tests.fuzzing import Results, from_pod, fuzz_tcp, fuzz_udp
from tests.helpers import DATA, start_serve

RECORDS = (
    "--host-record=www.upstream.test,192.0.2.53",
    "--host-record=svc1.ns1.svc.cluster.local,10.96.99.99",
    "--host-record=auto.mesh.test,192.0.2.77",
)
POD = PodSpec("client1", "10.244.1.10", "ns1", ip6="fd00:10:244::10")

REPLAY = r"""
import socket, struct, sys
proto, host, q = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2)
        s.sendto(q, (host, 53)); print(s.recv(65535).hex())
    else:
        c = socket.create_connection((host, 53), timeout=2)
        c.sendall(struct.pack("!H", len(q)) + q); c.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := c.recv(65535):
            buf += chunk
        print(buf[2:2 + struct.unpack("!H", buf[:2])[0]].hex() if len(buf) >= 2 else "")
except OSError:
    print("")
"""


def _row(path: str, proto: str, host: str, r: Results, alive: bool, secs: float) -> tuple:
    rss = f"{r.rss_kib[len(r.rss_kib) // 4]} -> {r.rss_kib[-1]}" if r.rss_kib else "-"
    return (path, proto, host, r.sent, r.replies, len(r.rejected), r.probes,
            len(r.probe_failures), rss, "yes" if alive else "NO", f"{secs:.0f}")  # fmt: skip


def serve_runs(packets: int, seed: int, rate: float) -> list[tuple[tuple[Any, ...], Results]]:
    out = []
    for proto, host in (("udp", "127.0.0.1"), ("udp", "::1"), ("tcp", "127.0.0.1"),
                        ("tcp", "::1")):  # fmt: skip
        listen = f"[{host}]:0" if ":" in host else f"{host}:0"
        served = start_serve(
            "--listen", listen, "--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"
        )
        t0 = time.monotonic()
        n = packets * 4 // 10 if proto == "udp" else packets // 10
        try:
            r: Results
            if proto == "udp":
                r = fuzz_udp(host, served.port, n, seed, served.proc.pid, rate)
            else:
                r = fuzz_tcp(host, served.port, n, seed, served.proc.pid)
            alive = served.proc.poll() is None
        finally:
            stop(served.proc)
        out.append((_row("serve", proto, host, r, alive, time.monotonic() - t0), r))
    return out


def whose(lab: Lab, pin: Path, proto: str, host: str, query: bytes) -> str:
    """Replay ``query`` alone from the pod and say who answered it, from the counters."""
    with CounterReader(pin, lambda: read_state(lab.state_dir)) as reader:
        before = reader.read().counters
        r = lab.run_in_pod(POD.name, sys.executable, "-c", REPLAY, proto, host, query.hex())
        time.sleep(0.05)
        after = reader.read().counters
    delta = {
        f"{m}:{k}": after[m][k] - before[m].get(k, 0)
        for m in after
        for k in after[m]
        if after[m][k] != before[m].get(k, 0)
    }
    if delta.get("FP_STATS:hit"):
        who = "kernel (fast path)"
    elif delta.get("REASONS:redirected"):
        who = "resolver"
    else:
        who = "kube-dns (passed: " + ", ".join(sorted(delta)) + ")"
    again = r.stdout.strip()
    return f"{who}; replayed reply {'identical' if again else 'none'}"


def bpf_runs(
    packets: int, seed: int, rate: float, attribute: int = 20
) -> list[tuple[tuple[Any, ...], Results]]:
    lab = Lab("fz", [POD]).up()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    pin = Path("/sys/fs/bpf/fz-bench")
    shutil.rmtree(pin, ignore_errors=True)
    out = []
    try:
        lab.start_upstream(*RECORDS)
        source = tmp / "cluster.yaml"
        shutil.copy(DATA / "node.yaml", source)
        agent = lab.start_agent(
            source, "--early-capture=0", "--query-rate=0", "--answer-rate=0", pin_dir=pin
        )
        try:
            for proto, host in (("udp", DNS_IP), ("udp", DNS_IP6), ("tcp", DNS_IP),
                                ("tcp", DNS_IP6)):  # fmt: skip
                n = packets * 4 // 10 if proto == "udp" else packets // 10
                t0 = time.monotonic()
                r = from_pod(lab, POD.name, proto, host, n, seed, rate, agent.proc.pid)
                alive = agent.proc.poll() is None
                out.append((_row("bpf", proto, host, r, alive, time.monotonic() - t0), r))
                for q, a, why in r.rejected[:attribute]:
                    print(f"rejected ({proto} {host}): {why}\n  query {q.hex()}\n  reply "
                          f"{a.hex()}\n  whose: {whose(lab, pin, proto, host, q)}",
                          file=sys.stderr)  # fmt: skip
        finally:
            stop(agent.proc)
    finally:
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.fuzz", description=__doc__)
    p.add_argument("--packets", type=int, default=1_000_000, help="along each path")
    p.add_argument("--rate", type=float, default=4000, help="UDP packets a second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", choices=("bpf", "serve"), default=None)
    args = p.parse_args(argv)
    runs = []
    if args.only != "serve":
        runs += bpf_runs(args.packets, args.seed, args.rate)
    if args.only != "bpf":
        runs += serve_runs(args.packets, args.seed, args.rate)
    failed = any(r.rejected or r.probe_failures or row[9] != "yes" for row, r in runs)
    for row, r in runs:
        for q, a, why in r.rejected[:3]:
            print(f"rejected ({row[0]} {row[1]} {row[2]}): {q.hex()} -> {a.hex()}: {why}",
                  file=sys.stderr)  # fmt: skip
    print(table(["path", "proto", "server", "sent", "replies", "rejected", "probes", "wrong",
                 "rss KiB (warm -> end)", "alive", "s"], [row for row, _ in runs]))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

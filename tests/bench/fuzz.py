"""The full fuzz run: ``python -m tests.bench.fuzz [--packets 1000000]``.

Mutated and random DNS messages at a real ``interceptor serve`` over UDP and TCP, IPv4 and
IPv6 (tests/fuzzing.py), and a table of what came back: replies, replies dnspython's strict
parser rejects (must be 0), valid queries among the fuzz answered wrongly (must be 0), the
server's RSS from warm to end, and whether it is still running.  The process tier runs the
same with 20,000 packets.  (Through the BPF path from a pod: not yet.)
"""

from __future__ import annotations

import argparse
import sys
import time

from devlab.netns import stop
from tests.bench.common import table
from tests.fuzzing import Results, fuzz_tcp, fuzz_udp
from tests.helpers import start_serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.fuzz", description=__doc__)
    p.add_argument("--packets", type=int, default=1_000_000, help="in all, over every run")
    p.add_argument("--rate", type=float, default=4000, help="UDP packets a second")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    runs = [("udp", "127.0.0.1"), ("udp", "::1"), ("tcp", "127.0.0.1"), ("tcp", "::1")]
    share = {"udp": args.packets * 4 // 10, "tcp": args.packets // 10}
    rows = []
    failed = False
    for proto, host in runs:
        listen = f"[{host}]:0" if ":" in host else f"{host}:0"
        served = start_serve(
            "--listen", listen, "--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"
        )
        t0 = time.monotonic()
        try:
            r: Results
            if proto == "udp":
                r = fuzz_udp(host, served.port, share[proto], args.seed, served.proc.pid, args.rate)
            else:
                r = fuzz_tcp(host, served.port, share[proto], args.seed)
            alive = served.proc.poll() is None
        finally:
            stop(served.proc)
        rss = f"{r.rss_kib[len(r.rss_kib) // 4]} -> {r.rss_kib[-1]}" if r.rss_kib else "-"
        rows.append((proto, host, r.sent, r.replies, len(r.rejected), r.probes,
                     len(r.probe_failures), rss, "yes" if alive else "NO",
                     f"{time.monotonic() - t0:.0f}"))  # fmt: skip
        failed |= bool(r.rejected or r.probe_failures or not alive)
        for q, a, why in r.rejected[:3]:
            print(f"rejected: {q.hex()} -> {a.hex()}: {why}", file=sys.stderr)
    print(table(["proto", "server", "sent", "replies", "rejected", "probes", "wrong",
                 "rss KiB (warm -> end)", "alive", "s"], rows))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

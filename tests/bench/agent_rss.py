"""Benchmark: the agent process's memory (VmRSS) on the netns node, with N services.

The whole process is measured, as CoreDNS's formula measures it: the interpreter, every
module loaded and the service map.  The agent builds its BPF programs in a short-lived
child, so bcc and LLVM are not in it; the table says so by checking the process's mappings.

Run as root from the repository root: ``.venv/bin/python -m tests.bench.agent_rss``
(``make bench``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.agent_rss", description=__doc__)
    p.add_argument("--services", type=positive, nargs="+", default=[1000])
    p.add_argument("--settle", type=float, default=3.0, help="seconds after the queries")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

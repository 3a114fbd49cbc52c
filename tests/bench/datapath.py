"""Cost of the BPF redirection, from a pod: dnsperf against the kube-dns address (captured,
rewritten by tc on the veth) and against the resolver's own address (no BPF rewrite), same
resolver, same load, same run.  Then the first-query latency after an agent restart and the
number of failed queries while it restarts.  Needs root.

    .venv/bin/python -m tests.bench.datapath [--duration 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from devlab.netns import DNS_IP, Lab, PodSpec, stop
from tests.bench.common import PerfResult, parse_dnsperf, table
from tests.bench.nodelocal import agent_flags, unlimited

RESOLVER = "169.254.20.10"
NAMES = 1000


def userspace_only() -> tuple[str, ...]:
    """``--no-fastpath`` when the agent has it: with the in-kernel fast path the queries
    through BPF would never reach the resolver, and this benchmark measures the cost of the
    redirection to it (tests.bench.peers measures the fast path)."""
    fastpath = ("--no-fastpath",) if "--no-fastpath" in agent_flags() else ()
    return fastpath + unlimited()


def write_inputs(tmp: Path) -> tuple[Path, Path]:
    items = [
        "- {apiVersion: v1, kind: Pod, metadata: {name: bench, namespace: bench},"
        " spec: {nodeName: node-1}, status: {podIPs: [{ip: 10.244.1.10}]}}"
    ]
    queries = []
    for i in range(NAMES):
        ip = f"10.96.{100 + i // 250}.{i % 250 + 1}"
        items.append(
            f"- {{apiVersion: v1, kind: Service, metadata: {{name: svc-{i}, namespace: bench}},"
            f" spec: {{clusterIP: {ip}}}}}"
        )
        queries.append(f"svc-{i}.bench.svc.cluster.local A")
    # kube-dns knows the same names, so queries that bypass the interceptor (during a
    # restart) are answered too, as in a real cluster.
    (tmp / "hosts").write_text(
        "".join(
            f"10.96.{100 + i // 250}.{i % 250 + 1} svc-{i}.bench.svc.cluster.local\n"
            for i in range(NAMES)
        )
    )
    source = tmp / "cluster.yaml"
    source.write_text("apiVersion: v1\nkind: List\nitems:\n" + "\n".join(items) + "\n")
    qfile = tmp / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n")
    return source, qfile


def dnsperf(lab: Lab, target: str, qfile: Path, duration: int, label: str) -> PerfResult:
    cmd = [
        "dnsperf",
        "-s",
        target,
        "-d",
        str(qfile),
        "-l",
        str(duration),
        "-c",
        "1",
        "-T",
        "1",
        "-q",
        "100",
        "-t",
        "2",
    ]
    r = lab.run_in_pod("bench", *cmd, timeout=duration + 60)
    if r.returncode != 0:
        raise SystemExit(f"dnsperf failed: {r.stderr}")
    return parse_dnsperf(label, "ip netns exec <pod> " + shlex.join(cmd), r.stdout)


def dig_ms(lab: Lab, name: str) -> float | None:
    r = lab.run_in_pod("bench", "dig", "+time=2", "+tries=1", name)
    m = re.search(r"Query time: (\d+) msec", r.stdout)
    return float(m.group(1)) if m and "status: NOERROR" in r.stdout else None


def restart_figures(
    lab: Lab, source: Path, pin: Path, agent_proc: subprocess.Popen[str]
) -> dict[str, float]:
    """Restart the agent while a pod keeps asking; count failures; time the first answer."""
    failures = 0
    asked = 0
    stop_flag = threading.Event()

    def ask() -> None:
        nonlocal failures, asked
        while not stop_flag.is_set():
            asked += 1
            if dig_ms(lab, "svc-1.bench.svc.cluster.local") is None:
                failures += 1

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.5)
    stop(agent_proc)
    t0 = time.monotonic()
    agent = lab.start_agent(source, *userspace_only(), pin_dir=pin)
    ready = time.monotonic() - t0
    first = dig_ms(lab, "svc-2.bench.svc.cluster.local")
    time.sleep(0.5)
    stop_flag.set()
    t.join()
    stop(agent.proc)
    return {
        "restart_to_ready_s": round(ready, 2),
        "first_query_ms": first if first is not None else -1.0,
        "queries_during_restart": asked,
        "failed_during_restart": failures,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-datapath-"))
    tmp.chmod(0o755)  # dnsmasq reads --addn-hosts after dropping to user nobody
    pin = Path("/sys/fs/bpf/bench-datapath")
    lab = Lab("bdp", [PodSpec("bench", "10.244.1.10", "bench")])
    try:
        source, qfile = write_inputs(tmp)
        lab.up()
        lab.start_upstream(f"--addn-hosts={tmp / 'hosts'}")
        agent = lab.start_agent(source, *userspace_only(), pin_dir=pin)
        runs = []
        for i in range(args.rounds):  # alternate, so drift on a shared VM hits both alike
            runs.append(dnsperf(lab, DNS_IP, qfile, args.duration, f"through BPF #{i + 1}"))
            runs.append(dnsperf(lab, RESOLVER, qfile, args.duration, f"direct #{i + 1}"))
        restart = restart_figures(lab, source, pin, agent.proc)
        bpf_qps = sum(r.qps for r in runs[0::2]) / args.rounds
        direct_qps = sum(r.qps for r in runs[1::2]) / args.rounds
        bpf_lat = sum(r.avg_latency_ms for r in runs[0::2]) / args.rounds
        direct_lat = sum(r.avg_latency_ms for r in runs[1::2]) / args.rounds
        overhead = 100 * (direct_qps - bpf_qps) / direct_qps
        if args.json:
            print(
                json.dumps(
                    {
                        "runs": [r.as_dict() for r in runs],
                        "restart": restart,
                        "qps_overhead_pct": round(overhead, 1),
                    },
                    indent=2,
                )
            )
            return
        print(
            table(
                ["path", "QPS", "avg ms", "max ms", "lost"],
                [
                    [
                        r.server,
                        f"{r.qps:,.0f}",
                        f"{r.avg_latency_ms:.3f}",
                        f"{r.max_latency_ms:.1f}",
                        str(r.queries_lost),
                    ]
                    for r in runs
                ],
            )
        )
        print(
            f"\nthrough BPF (10.96.0.10, rewritten on the veth): {bpf_qps:,.0f} QPS, "
            f"{bpf_lat:.3f} ms avg; direct (169.254.20.10): {direct_qps:,.0f} QPS, "
            f"{direct_lat:.3f} ms avg"
        )
        print(f"redirection cost: {overhead:.1f}% of QPS (mean of {args.rounds} runs each)")
        if userspace_only():
            print("agent run with --no-fastpath: both paths end in the userspace resolver")
        print("restart:", ", ".join(f"{k} {v}" for k, v in restart.items()))
        print("\ncommand:", runs[0].command)
    finally:
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()

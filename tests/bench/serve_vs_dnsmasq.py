"""Benchmark: ``interceptor serve`` against dnsmasq on the same names, plus answer-table memory.

Why dnsmasq: it is a small, single-threaded C server that answers local names from an
in-memory table, which is exactly what the interceptor's hot path does (one dict lookup and a
byte concatenation in :func:`interceptor.dns.message.fast_response`).  The ratio of the two
QPS figures therefore says how much the Python implementation costs against a mature C one,
on the same machine, in the same run, with the same client and the same queries.

Why memory too: every name's answers are precomputed, so memory grows with the cluster.  The
second table shows what a ServiceMap costs per Service at 10k and 100k Services, measured in a
fresh subprocess per size so one size's garbage cannot flatter or spoil the next.

Run from the repository root: ``.venv/bin/python -m tests.bench.serve_vs_dnsmasq``
(``make bench``).  All traffic goes to 127.0.0.1; dnsmasq has no upstream at all and the
interceptor's upstream is an unused loopback port.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from tests.bench.common import (
    LOOPBACK,
    BenchError,
    PerfParams,
    PerfResult,
    dnsperf_command,
    free_port,
    pinning,
    positive,
    require_tool,
    run_dnsperf,
    service_ip,
    service_manifest,
    stop_process,
    table,
    wait_until_answers,
)

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "bench"
ZONE = "cluster.local"
DNSMASQ = "/usr/sbin/dnsmasq"

# Defaults found by sweeping dnsperf -c 1..4, -T 1..4, -q 10..1000 (10 s runs, 3 repeats,
# dnsperf pinned to one CPU and the server to the other) on the 2-core benchmark VM:
#   -c 2 -T 2 -q 50 gave the highest QPS for both servers (~125-155k) with no lost queries;
#   -q 20-30 left the pipe short of work (lower QPS); -q 200+ added latency but no QPS, and
#   dnsmasq started dropping queries (about 900 lost at -q 500, from its small UDP receive
#   buffer); -T 1 gave about 10% less; unpinned runs were noisier, not faster.
# In every run dnsperf used ~100% of its CPU, so the client is (close to) the limit: the
# QPS figures are lower bounds, dnsmasq's more so, since it showed idle time at -q 200.
DEFAULT_CLIENTS = 2
DEFAULT_THREADS = 2
DEFAULT_OUTSTANDING = 50

MEMORY_SIZES = (10_000, 100_000)


def fqdn(index: int) -> str:
    """The DNS name of service ``index``."""
    return f"svc-{index}.{NAMESPACE}.svc.{ZONE}"


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Inputs:
    """The files both servers and dnsperf read, generated from one list of names so the two
    servers are guaranteed to serve identical data."""

    services_yaml: Path
    dnsmasq_conf: Path
    queries: Path
    names: int


def write_inputs(workdir: Path, names: int) -> Inputs:
    """Write the Service list (interceptor), the host-record conf (dnsmasq) and the dnsperf
    query file (A queries for every name, once each; dnsperf loops over the file)."""
    services = workdir / "services.yaml"
    services.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [service_manifest(i, NAMESPACE) for i in range(names)],
            },
            sort_keys=False,
        )
    )
    conf = workdir / "dnsmasq.conf"
    conf.write_text("".join(f"host-record={fqdn(i)},{service_ip(i)}\n" for i in range(names)))
    queries = workdir / "queries.txt"
    queries.write_text("".join(f"{fqdn(i)} A\n" for i in range(names)))
    return Inputs(services, conf, queries, names)


# ----------------------------------------------------------------------------- servers


def interceptor_command(inputs: Inputs, port: int, upstream: str) -> list[str]:
    """``interceptor serve`` from this venv, forwarding to ``upstream`` (a loopback address:
    for the cluster names a port nobody listens on, so that anything that slipped through
    cannot leave the machine)."""
    exe = Path(sys.executable).with_name("interceptor")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "interceptor"]
    return [
        *base,
        "serve",
        "--source",
        str(inputs.services_yaml),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        upstream,
    ]


def dnsmasq_base(dnsmasq: str, port: int) -> list[str]:
    """dnsmasq on a loopback port: no resolv.conf, no /etc/hosts, in the foreground.  An
    empty ``--pid-file=`` keeps it from writing /run/dnsmasq.pid, and ``--log-facility=-``
    puts its log into our log file instead of syslog."""
    return [
        dnsmasq,
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--keep-in-foreground",
        "--pid-file=",
        "--log-facility=-",
    ]


def dnsmasq_command(dnsmasq: str, inputs: Inputs, port: int) -> list[str]:
    """dnsmasq answering only its host-records: no --server, so it has no upstream to
    forward to; ``-C`` replaces /etc/dnsmasq.conf (startup-only log: no --log-queries)."""
    return [
        *dnsmasq_base(dnsmasq, port),
        "--cache-size=10000",
        "-C",
        str(inputs.dnsmasq_conf),
    ]


@dataclass
class Running:
    """A started server: its process (for teardown by PID) and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    command: list[str]
    startup_s: float


def start_server(
    name: str,
    build: Callable[[int], list[str]],
    log: Path,
    inputs: Inputs,
    cpus: set[int] | None,
    reserved: set[int],
    attempts: int = 3,
    name_of: Callable[[int], str] = fqdn,
) -> Running:
    """Start a server on a free loopback port and wait until it answers the first and the
    last name correctly (so its data is fully loaded).

    Retried because a "free" port can be taken between probing and binding.  The process gets
    its own session so a Ctrl-C reaches only this script, whose ``finally`` then stops the
    servers in order instead of racing their own signal handling.  ``cpus`` pins it (see
    :func:`cpu_plan`); ``reserved`` are ports it must not take, and gets its port added.
    """
    last: BenchError | None = None
    for _ in range(attempts):
        port = free_port(exclude=reserved)
        cmd = build(port)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pinning(cpus),
            )
        try:
            t = wait_until_answers(proc, port, name_of(0), service_ip(0), name, log)
            last_i = inputs.names - 1
            wait_until_answers(proc, port, name_of(last_i), service_ip(last_i), name, log)
        except BenchError as exc:
            stop_process(proc)
            last = exc
            continue
        except BaseException:
            # Ctrl-C while waiting: the caller does not know this process yet.
            stop_process(proc)
            raise
        reserved.add(port)
        return Running(name, proc, port, cmd, t)
    assert last is not None
    raise last


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration, so a killed benchmark (a CI timeout)
    still runs its ``finally`` blocks and leaves no server behind."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress(msg: str) -> None:
    """Progress goes to stderr so ``--json`` output on stdout stays parseable."""
    print(msg, file=sys.stderr, flush=True)


def cpu_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(dnsperf CPUs, server CPUs).  With two or more CPUs, dnsperf gets the first and the
    server under test the second: each then has a core to itself, so the scheduler cannot
    make either server look slower by stacking it onto dnsperf's core, and runs repeat."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Generate inputs, start both servers, run dnsperf against each in turn, stop both."""
    dnsperf = require_tool("dnsperf")
    dnsmasq = require_tool("dnsmasq", DNSMASQ)
    require_tool("dig")
    params = PerfParams(args.duration, args.clients, args.threads, args.outstanding)
    client_cpus, server_cpus = cpu_plan(args.pin)
    servers: list[Running] = []
    results: list[PerfResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        workdir = Path(tmp)
        inputs = write_inputs(workdir, args.names)
        try:
            upstream_port = free_port()
            reserved = {upstream_port}
            servers.append(
                start_server(
                    "interceptor",
                    lambda p: interceptor_command(inputs, p, f"{LOOPBACK}:{upstream_port}"),
                    workdir / "interceptor.log",
                    inputs,
                    server_cpus,
                    reserved,
                )
            )
            servers.append(
                start_server(
                    "dnsmasq",
                    lambda p: dnsmasq_command(dnsmasq, inputs, p),
                    workdir / "dnsmasq.log",
                    inputs,
                    server_cpus,
                    reserved,
                )
            )
            for srv in servers:
                progress(
                    f"{srv.name}: pid {srv.proc.pid}, port {srv.port}, "
                    f"answering after {srv.startup_s:.2f}s; running dnsperf for {args.duration}s"
                )
                cmd = dnsperf_command(dnsperf, srv.port, inputs.queries, params)
                results.append(run_dnsperf(srv.name, cmd, args.duration, srv.proc.pid, client_cpus))
        finally:
            for srv in servers:
                stop_process(srv.proc)
    return run_report(args, params, client_cpus, server_cpus, servers, results)


def run_report(
    args: argparse.Namespace,
    params: PerfParams,
    client_cpus: set[int] | None,
    server_cpus: set[int] | None,
    servers: list[Running],
    results: list[PerfResult],
) -> dict[str, Any]:
    """One throughput run as the report (and --json) shows it."""
    return {
        "names": args.names,
        "params": asdict(params),
        "cpus": {
            "dnsperf": sorted(client_cpus) if client_cpus else None,
            "servers": sorted(server_cpus) if server_cpus else None,
        },
        "servers": {s.name: {"command": shlex.join(s.command)} for s in servers},
        "results": [r.as_dict() for r in results],
        "ratio_qps": ratio(results, "qps"),
        "ratio_latency": ratio(results, "avg_latency_ms"),
    }


EXTERNAL_DOMAIN = "example.test"
ORIGIN_TTL = 3600


def external(index: int) -> str:
    """An external (not cluster) name: forwarded by both servers, then cached."""
    return f"ext-{index}.{EXTERNAL_DOMAIN}"


def origin_queries(log: Path) -> int:
    """Queries the origin answered so far (its --log-queries lines)."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if " query[" in line)


def run_cached(args: argparse.Namespace) -> dict[str, Any]:
    """Cached external names: an origin dnsmasq (authoritative for ``example.test``, TTL 1 h,
    logging every query) behind ``interceptor serve --upstream`` and behind a caching
    dnsmasq.  Each server is warmed with one pass over the names, then measured; the origin's
    log proves that no measured query reached it (every answer came from a cache)."""
    dnsperf = require_tool("dnsperf")
    dnsmasq = require_tool("dnsmasq", DNSMASQ)
    params = PerfParams(args.duration, args.cached_clients, args.threads, args.outstanding)
    client_cpus, server_cpus = cpu_plan(args.pin)
    servers: list[Running] = []
    results: list[PerfResult] = []
    runs: dict[str, list[PerfResult]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cached-") as tmp:
        workdir = Path(tmp)
        inputs = write_inputs(workdir, args.names)
        conf = workdir / "origin.conf"
        conf.write_text(
            "".join(f"host-record={external(i)},{service_ip(i)}\n" for i in range(args.names))
        )
        queries = workdir / "external.txt"
        queries.write_text("".join(f"{external(i)} A\n" for i in range(args.names)))
        origin_log = workdir / "origin.log"
        origin: subprocess.Popen[bytes] | None = None
        try:
            reserved: set[int] = set()
            origin_port = free_port()
            reserved.add(origin_port)
            with origin_log.open("ab") as out:
                origin = subprocess.Popen(
                    [
                        *dnsmasq_base(dnsmasq, origin_port),
                        f"--local-ttl={ORIGIN_TTL}",
                        "--log-queries",
                        "-C",
                        str(conf),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            wait_until_answers(origin, origin_port, external(0), service_ip(0), "origin")
            upstream = f"{LOOPBACK}:{origin_port}"
            servers.append(
                start_server(
                    "interceptor",
                    lambda p: interceptor_command(inputs, p, upstream),
                    workdir / "interceptor.log",
                    inputs,
                    server_cpus,
                    reserved,
                    name_of=external,
                )
            )
            servers.append(
                start_server(
                    "dnsmasq",
                    lambda p: [
                        *dnsmasq_base(dnsmasq, p),
                        f"--server={LOOPBACK}#{origin_port}",
                        "--cache-size=10000",
                    ],
                    workdir / "dnsmasq.log",
                    inputs,
                    server_cpus,
                    reserved,
                    name_of=external,
                )
            )
            warm = PerfParams(1, 1, 1, 10)
            for srv in servers:  # one pass over the names fills each cache
                cmd = dnsperf_command(dnsperf, srv.port, queries, warm) + ["-n", "1"]
                run_dnsperf(srv.name, cmd, 1)
            before = origin_queries(origin_log)
            runs = {s.name: [] for s in servers}
            for round_ in range(args.rounds):  # alternating, so drift hits both alike
                for srv in servers:
                    progress(
                        f"{srv.name} (cached names, round {round_ + 1}/{args.rounds}): "
                        f"running dnsperf for {args.duration}s"
                    )
                    cmd = dnsperf_command(dnsperf, srv.port, queries, params)
                    runs[srv.name].append(
                        run_dnsperf(srv.name, cmd, args.duration, srv.proc.pid, client_cpus)
                    )
            # Each server's median round by QPS: one disturbed run moves neither figure.
            results = [sorted(rs, key=lambda r: r.qps)[len(rs) // 2] for rs in runs.values()]
            leaked = origin_queries(origin_log) - before
        finally:
            for srv in servers:
                stop_process(srv.proc)
            stop_process(origin)
    return {
        **run_report(args, params, client_cpus, server_cpus, servers, results),
        "origin_queries_during_runs": leaked,
        "rounds": args.rounds,
        "all_qps": {name: [round(r.qps) for r in rs] for name, rs in runs.items()},
    }


def ratio(results: list[PerfResult], field: str) -> float | None:
    """interceptor / dnsmasq for one metric (None if either is missing or zero)."""
    by = {r.server: float(getattr(r, field)) for r in results}
    a, b = by.get("interceptor"), by.get("dnsmasq")
    return round(a / b, 3) if a is not None and b else None


# ------------------------------------------------------------------------------ memory


def vm_rss_bytes() -> int:
    """Resident set size from /proc/self/status: what the kernel actually charges the
    process, including allocator slack that tracemalloc cannot see."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status")


def memory_child(count: int) -> dict[str, Any]:
    """Build a ServiceMap of ``count`` Services and measure it (runs in its own process).

    Two builds: the first with tracemalloc off, for an RSS delta not inflated by
    tracemalloc's own bookkeeping; the second under tracemalloc, for the Python-level bytes
    retained (current) and the transient high-water mark (peak).  Each manifest dict is
    dropped right after parsing, so only what the map keeps is counted, as in the server.
    """
    import gc
    import tracemalloc

    from interceptor.model.objects import parse
    from interceptor.model.servicemap import ServiceMap
    from interceptor.settings import ZoneSettings

    def build() -> tuple[ServiceMap, float]:
        start = time.perf_counter()
        smap = ServiceMap(ZoneSettings(cluster_domain=ZONE))
        for i in range(count):
            smap.upsert(parse(service_manifest(i, NAMESPACE)))
        return smap, time.perf_counter() - start

    # Warm up lazily-created module state (caches, interned strings) outside both windows.
    warm = ServiceMap(ZoneSettings(cluster_domain=ZONE))
    warm.upsert(parse(service_manifest(0, "warmup")))
    del warm
    gc.collect()

    rss_before = vm_rss_bytes()
    smap, build_s = build()
    gc.collect()
    rss_delta = vm_rss_bytes() - rss_before
    answers = len(smap.answers)
    stats = smap.stats()
    del smap
    gc.collect()

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    smap, _ = build()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(smap.answers) == answers
    return {
        "services": count,
        "answers": answers,
        "rrsets": stats["rrsets"],
        "build_s": round(build_s, 3),
        "tracemalloc_current": current - base,
        "tracemalloc_peak": peak - base,
        "rss_delta": rss_delta,
        "bytes_per_service_traced": round((current - base) / count),
        "bytes_per_service_rss": round(rss_delta / count),
    }


def run_memory(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """One subprocess per size: each starts from a clean heap, and the parent's own memory
    (YAML, dnsperf results) is no part of the measurement."""
    out = []
    for n in sizes:
        progress(f"memory: building a ServiceMap of {n} services in a subprocess")
        proc = subprocess.run(
            [sys.executable, "-m", "tests.bench.serve_vs_dnsmasq", "--memory-child", str(n)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"memory run for {n} services failed:\n{proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------ output


def unsaturated(results: list[dict[str, Any]], threshold: float = 90.0) -> list[str]:
    """Runs where neither dnsperf nor the server kept its (pinned) CPU busy.  Something else
    then took the CPU (another job, a noisy VM neighbour), and the QPS measures the machine,
    not the server: say so instead of letting a skewed ratio pass as a result."""
    out = []
    for r in results:
        server, client = r["server_cpu_pct"], r["dnsperf_cpu_pct"]
        if server is not None and client is not None and max(server, client) < threshold:
            out.append(
                f"{r['server']}: neither it ({server:.0f}% CPU) nor dnsperf ({client:.0f}%) "
                "was saturated; the machine was probably busy, rerun for a clean comparison"
            )
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cpu_line(cpus: dict[str, list[int] | None]) -> str:
    if not cpus["dnsperf"]:
        return "CPU pinning: off"
    return f"CPU pinning: dnsperf on CPU {cpus['dnsperf']}, server on CPU {cpus['servers']}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _rcodes(r: dict[str, Any]) -> str:
    """NOERROR count, plus any other rcode: anything but NOERROR means a server is not
    answering the benchmark names and its QPS is not comparable."""
    text = f"NOERROR {r['noerror']:,}"
    return text if r["other_rcodes"] == "-" else f"{text}; {r['other_rcodes']}"


def render(
    throughput: dict[str, Any] | None,
    memory: list[dict[str, Any]],
    cached: dict[str, Any] | None = None,
) -> str:
    """The human-readable report: parameters, commands, and the tables."""
    lines: list[str] = []
    for what, run in (
        ("service names (cluster, precomputed)", throughput),
        ("external names, all cached (forwarded once to an origin dnsmasq)", cached),
    ):
        if run is not None:
            lines += render_throughput(what, run)
    lines += render_memory(memory)
    return "\n".join(lines)


def render_throughput(what: str, throughput: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if throughput is not None:
        p = throughput["params"]
        lines += [
            f"DNS throughput: {throughput['names']} {what}, 100% A queries over UDP, "
            f"all on {LOOPBACK}",
            f"dnsperf parameters: -l {p['duration']} -c {p['clients']} -T {p['threads']} "
            f"-q {p['outstanding']} -t {p['timeout']:g}",
            _cpu_line(throughput["cpus"]),
            "",
        ]
        for name, srv in throughput["servers"].items():
            lines.append(f"{name} command: {srv['command']}")
        for r in throughput["results"]:
            lines.append(f"dnsperf ({r['server']}): {r['command']}")
        lines.append("")
        rows = [
            [
                r["server"],
                f"{r['qps']:,.0f}",
                f"{r['avg_latency_ms']:.3f} ms",
                f"{r['max_latency_ms']:.3f} ms",
                f"{r['queries_completed']:,}",
                f"{r['queries_lost']:,}",
                _rcodes(r),
                _pct(r["server_cpu_pct"]),
                _pct(r["dnsperf_cpu_pct"]),
            ]
            for r in throughput["results"]
        ]
        headers = ["server", "QPS", "avg latency", "max latency", "completed", "lost"]
        lines.append(table([*headers, "rcodes", "server CPU", "dnsperf CPU"], rows))
        q, lat = throughput["ratio_qps"], throughput["ratio_latency"]
        if q is not None:
            lines.append(f"interceptor/dnsmasq: QPS x{q:.2f}, avg latency x{lat:.2f}")
        lines.append(
            "CPU = CPU time / wall time of the run: a server near 100% is saturated; dnsperf "
            "near 100% means the client is the limit and that row's QPS is a lower bound."
        )
        lines += [f"warning: {w}" for w in unsaturated(throughput["results"])]
        if "all_qps" in throughput:
            lines.append(
                f"each row is the server's median of {throughput['rounds']} alternating "
                "rounds; QPS of every round: "
                + "; ".join(
                    f"{name} {', '.join(f'{q:,}' for q in qs)}"
                    for name, qs in throughput["all_qps"].items()
                )
            )
        if "origin_queries_during_runs" in throughput:
            lines.append(
                f"origin queries during the measured runs: "
                f"{throughput['origin_queries_during_runs']} (0: every answer was a cache hit)"
            )
        lines.append("")
    return lines


def render_memory(memory: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    if memory:
        lines += [
            "Answer-table memory: ServiceMap of ClusterIP services, one named port each",
            "traced = tracemalloc (Python heap kept by the map / transient peak while building);"
            " RSS = VmRSS growth over a separate, untraced build; one subprocess per size",
        ]
        rows = [
            [
                f"{m['services']:,}",
                f"{m['answers']:,}",
                mib(m["tracemalloc_current"]),
                mib(m["tracemalloc_peak"]),
                mib(m["rss_delta"]),
                f"{m['bytes_per_service_traced']:,}",
                f"{m['bytes_per_service_rss']:,}",
                f"{m['build_s']:.1f} s",
            ]
            for m in memory
        ]
        lines.append(
            table(
                [
                    "services",
                    "answers",
                    "traced current",
                    "traced peak",
                    "RSS delta",
                    "B/svc traced",
                    "B/svc RSS",
                    "build",
                ],
                rows,
            )
        )
    return lines


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.serve_vs_dnsmasq",
        description="Compare interceptor serve with dnsmasq under dnsperf, and measure the "
        "memory of the precomputed answer table.",
    )
    p.add_argument("--duration", type=positive, default=10, help="seconds per dnsperf run")
    p.add_argument("--names", type=positive, default=1000, help="service names to serve")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--clients", type=positive, default=DEFAULT_CLIENTS, help="dnsperf -c")
    p.add_argument("--threads", type=positive, default=DEFAULT_THREADS, help="dnsperf -T")
    p.add_argument("--outstanding", type=positive, default=DEFAULT_OUTSTANDING, help="dnsperf -q")
    p.add_argument(
        "--memory-sizes",
        type=lambda s: tuple(positive(x) for x in s.split(",") if x),
        default=MEMORY_SIZES,
        metavar="N,N",
        help="ServiceMap sizes to measure (default: 10000,100000)",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin dnsperf and the servers to separate CPUs",
    )
    p.add_argument(
        "--cached-clients",
        type=positive,
        default=8,
        help="dnsperf -c for the cached-names run (8, as the issue's measurement)",
    )
    p.add_argument("--skip-cached", action="store_true", help="skip the cached-names run")
    p.add_argument(
        "--rounds", type=positive, default=3, help="alternating rounds of the cached-names run"
    )
    p.add_argument("--skip-memory", action="store_true", help="only run the DNS benchmark")
    p.add_argument("--skip-dns", action="store_true", help="only run the memory benchmark")
    p.add_argument("--memory-child", type=positive, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return 0
    if args.names > 65534:
        progress("note: more than 65534 names spill past 10.96.0.0/16 into the rest of /12")
    try:
        with terminate_on_sigterm():
            throughput = None if args.skip_dns else run_throughput(args)
            cached = None if args.skip_dns or args.skip_cached else run_cached(args)
            memory = [] if args.skip_memory else run_memory(args.memory_sizes)
    except BenchError as exc:
        progress(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        progress("interrupted; servers stopped")
        return 130
    if args.json:
        print(json.dumps({"throughput": throughput, "cached": cached, "memory": memory}, indent=2))
    else:
        print(render(throughput, memory, cached))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

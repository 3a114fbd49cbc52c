"""Issue 5: external names from a pod with ``ndots:5``, through real glibc, with and without
the interceptor; then cached-answer QPS against dnsmasq, unbound (and CoreDNS) as caching
forwarders in the same topology.  Needs root.

    .venv/bin/python -m tests.bench.ndots [--lookups 300] [--seconds 10] [--out docs/bench]

Part 1.  The pod's resolv.conf is the kubelet's (``search bench.svc.cluster.local
svc.cluster.local cluster.local``, ``options ndots:5``), so ``ext-7.example.test`` (two dots)
is first tried with every search suffix.  The lab's kube-dns (dnsmasq at 10.96.0.10 in its own
netns) is authoritative for ``cluster.local`` (NXDOMAIN for the junk, as CoreDNS is) and for a
synthetic ``example.test`` zone (A and AAAA for every name, TTL 300), and logs every query it
gets.  A small program in the pod calls glibc's ``getaddrinfo`` once per name, sequentially,
timing each call: first every name once (cold), then every name again (warm), for

1. baseline: no agent, the pod asks kube-dns directly;
2. the interceptor agent without autopath (search-path junk answered NXDOMAIN on the node);
3. the agent with ``--autopath`` (the first query is completed on the server side).

with ``AF_INET`` (A only, as ``getent ahostsv4``) and ``AF_UNSPEC`` (A and AAAA in parallel,
what most programs ask for).  Figures: queries kube-dns saw per lookup (from its log), queries
the pod sent per lookup (from the agent's metrics), lookup latency p50/p99.

Part 2.  dnsperf from the pod with ``qps-<i>.example.test A`` for 1000 names, all in cache
(warmed with one pass, then checked), against the agent (forwarding and caching, the pod asks
10.96.0.10), and dnsmasq, unbound and CoreDNS as caching forwarders on 169.254.20.10 with
kube-dns as their upstream.  Queries that reached kube-dns during the run are counted: a cache
that missed shows up there.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devlab.netns import DNS_IP, RESOLVER_IP, Lab, PodSpec, stop
from tests.bench.common import BenchError, positive, require_tool
from tests.bench.nodelocal import (
    CpuUse,
    Load,
    Measured,
    Server,
    add_node_local_address,
    agent_flags,
    background_load,
    check_answers,
    coredns_binary,
    cpu_note,
    cpu_plan,
    dig_from_pod,
    fmt_us,
    forwarder_commands,
    load_average,
    md_table,
    percentile,
    run_dnsperf,
    start_agent,
    start_in_node,
    stop_agent,
    write_expected,
)

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "bench"
POD, POD_IP = "app", "10.244.1.10"
PIN = Path("/sys/fs/bpf/bench-ndots")
ZONE = "example.test"
WANTED = {
    "answered": "interceptor_requests_total",
    "fast path": 'interceptor_fastpath_total{result="hit"',
    "junk in kernel": 'interceptor_fastpath_total{result="nxdomain"',
}

LOOKUP = r"""
import json, socket, sys, time
family = {"inet": socket.AF_INET, "unspec": socket.AF_UNSPEC}[sys.argv[1]]
out = []
for name in open(sys.argv[2]).read().split():
    t = time.perf_counter_ns()
    try:
        got = sorted({ai[4][0] for ai in socket.getaddrinfo(name, None, family, socket.SOCK_DGRAM)})
    except socket.gaierror as exc:
        got = ["error: " + str(exc)]
    out.append([(time.perf_counter_ns() - t) / 1000, got])
print(json.dumps(out))
"""
"""One glibc ``getaddrinfo`` per name, in order, each timed (µs).  Python's
``socket.getaddrinfo`` is a thin wrapper over glibc's; the interpreter adds a few µs."""


def v4(kind: str, i: int) -> str:
    return f"10.77.{(i // 250) + (100 if kind == 'qps' else 0)}.{i % 250 + 1}"


def v6(kind: str, i: int) -> str:
    """In the canonical text form glibc returns (RFC 5952), so answers compare as strings."""
    return str(ipaddress.IPv6Address(f"fd00:77:{1 if kind == 'qps' else 0}::{i + 1:x}"))


def name(kind: str, i: int) -> str:
    return f"{kind}-{i}.{ZONE}"


@dataclass(frozen=True)
class Inputs:
    hosts: Path
    cluster_yaml: Path
    lookups: dict[str, Path]
    """Per address family, its own names (so each family's first pass is really cold)."""
    qps_queries: Path
    qps_expected: Path


def write_inputs(tmp: Path, lookups: int, qps_names: int) -> Inputs:
    hosts = tmp / "hosts"
    # kube-dns knows the cluster name the agent knows, so the probe gets NOERROR from both.
    lines = ["10.96.50.1 web.bench.svc.cluster.local"]
    for kind, count in (("inet", lookups), ("unspec", lookups), ("qps", qps_names)):
        for i in range(count):
            lines += [f"{v4(kind, i)} {name(kind, i)}", f"{v6(kind, i)} {name(kind, i)}"]
    hosts.write_text("\n".join(lines) + "\n")
    cluster = tmp / "cluster.yaml"
    cluster.write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        f"- {{apiVersion: v1, kind: Namespace, metadata: {{name: {NAMESPACE}}}}}\n"
        f"- {{apiVersion: v1, kind: Pod, metadata: {{name: {POD}, namespace: {NAMESPACE}}},"
        f" spec: {{nodeName: node-1}}, status: {{podIP: {POD_IP}, podIPs: [{{ip: {POD_IP}}}]}}}}\n"
        f"- {{apiVersion: v1, kind: Service, metadata: {{name: web, namespace: {NAMESPACE}}},"
        " spec: {clusterIP: 10.96.50.1, ports: [{name: http, port: 80}]}}\n"
    )
    files = {}
    for kind in ("inet", "unspec"):
        files[kind] = tmp / f"lookups-{kind}.txt"
        files[kind].write_text("".join(f"{name(kind, i)}\n" for i in range(lookups)))
    queries = tmp / "qps.txt"
    queries.write_text("".join(f"{name('qps', i)} A\n" for i in range(qps_names)))
    expected = write_expected(
        tmp / "qps-expected.json", [(name("qps", i), v4("qps", i)) for i in range(qps_names)]
    )
    return Inputs(hosts, cluster, files, queries, expected)


# ------------------------------------------------------------------------ kube-dns log


@dataclass
class QueryLog:
    """kube-dns's ``--log-queries`` file: queries it received, counted per window."""

    path: Path

    def lines(self) -> list[str]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if "query[" in ln and f".{ZONE}" in ln]

    def settled(self) -> int:
        """The count once dnsmasq has written everything (it logs asynchronously)."""
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.3:
            now = len(self.lines())
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.05)
        return last

    def types(self, start: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for ln in self.lines()[start:]:
            m = re.search(r"query\[(\w+)\] (\S+)", ln)
            if m:
                key = m.group(1) + (" search-path" if ".cluster.local" in m.group(2) else "")
                out[key] = out.get(key, 0) + 1
        return out


# -------------------------------------------------------------------------- lookups


@dataclass
class Pass:
    """One pass of glibc lookups over every name."""

    latencies_us: list[float]
    upstream: int
    upstream_types: dict[str, int]
    pod_queries: float | None
    failures: list[str]
    resolver_queries: float | None = None
    """Per lookup: queries the resolver process answered (the agent's request counter)."""
    kernel_junk: float | None = None
    """Per lookup: search-path junk answered NXDOMAIN in the kernel (fast path nxdomain)."""

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies_us), q)


@dataclass
class Setup:
    label: str
    flags: tuple[str, ...] | None
    """Agent flags, or None for the baseline (no agent)."""
    note: str = ""


@dataclass
class LookupResult:
    setup: Setup
    family: str
    cold: Pass
    warm: Pass
    extra: dict[str, str] = field(default_factory=dict)


def lookup_pass(
    lab: Lab,
    inputs: Inputs,
    family: str,
    log: QueryLog,
    cpus: set[int] | None,
    agent: Server | None,
) -> Pass:
    start = log.settled()
    before = agent.counters() if agent and agent.counters else {}
    python = shutil.which("python3") or "/usr/bin/python3"
    r = lab.run_in_pod(
        POD,
        "taskset",
        "-c",
        ",".join(str(c) for c in sorted(cpus)) if cpus else f"0-{(os.cpu_count() or 1) - 1}",
        python,
        "-c",
        LOOKUP,
        family,
        str(inputs.lookups[family]),
        timeout=600,
    )
    if r.returncode != 0:
        raise BenchError(f"lookup program failed: {r.stderr.strip()[-500:]}")
    results = json.loads(r.stdout)
    names = inputs.lookups[family].read_text().split()
    failures = []
    for n, (_, got) in zip(names, results, strict=True):
        kind, i = n.split(".")[0].split("-")
        want = sorted([v4(kind, int(i))] + ([v6(kind, int(i))] if family == "unspec" else []))
        if got != want:
            failures.append(f"{n}: {got} (expected {want})")
    upstream = log.settled() - start
    pod_queries = resolver = junk = None
    if agent and agent.counters:
        after = agent.counters()
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if "answered" in delta:
            # Every query is answered by the resolver or in the kernel (junk is a kernel hit).
            pod_queries = (delta["answered"] + delta.get("fast path", 0.0)) / len(names)
            resolver = delta["answered"] / len(names)
            junk = delta.get("junk in kernel", 0.0) / len(names)
    return Pass(
        [lat for lat, _ in results],
        upstream,
        log.types(start),
        pod_queries,
        failures,
        resolver,
        junk,
    )


def run_lookups(
    lab: Lab,
    inputs: Inputs,
    setups: list[Setup],
    families: list[str],
    log: QueryLog,
    client_cpus: set[int] | None,
    server_cpus: set[int] | None,
) -> list[LookupResult]:
    out = []
    for setup in setups:
        for family in families:
            # A fresh agent per family and setup: the cold pass starts with an empty cache.
            agent = None
            if setup.flags is not None:
                agent = start_agent(
                    lab, inputs.cluster_yaml, PIN, server_cpus, setup.label, setup.flags, WANTED
                )
            try:
                progress(f"{setup.label}, {family}: cold and warm lookups")
                cold = lookup_pass(lab, inputs, family, log, client_cpus, agent)
                warm = lookup_pass(lab, inputs, family, log, client_cpus, agent)
            finally:
                if agent is not None:
                    stop_agent(agent, PIN)
            out.append(LookupResult(setup, family, cold, warm))
    return out


PROBE = r"""
import json, socket, struct, sys, time
target, count = sys.argv[1], int(sys.argv[2])
out = {}
for name in sys.argv[3:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((target, 53))
    s.settimeout(2)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
    lat, rcodes = [], set()
    for i in range(count + 1):
        t = time.perf_counter_ns()
        s.send(struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + question)
        reply = s.recv(4096)
        if i:  # the first query warms whatever cache there is
            lat.append((time.perf_counter_ns() - t) / 1000)
        rcodes.add(reply[3] & 0xF)
        time.sleep(0.001)
    out[name] = [lat, sorted(rcodes)]
print(json.dumps(out))
"""
"""One A query at a time over a connected UDP socket (no glibc, no search path): what each
kind of answer costs on its own, which is what the lookup figures are made of."""

KINDS = {
    "cluster name (web.bench.svc.cluster.local)": "web.bench.svc.cluster.local",
    "search-path junk (ext-0.example.test.bench.svc.cluster.local)": (
        f"ext-0.{ZONE}.bench.svc.cluster.local"
    ),
    f"external name, cached after the first query (qps-0.{ZONE})": f"qps-0.{ZONE}",
}
RCODES = {0: "NOERROR", 3: "NXDOMAIN", 2: "SERVFAIL", 5: "REFUSED"}


def probe(lab: Lab, count: int) -> dict[str, tuple[list[float], str]]:
    python = shutil.which("python3") or "/usr/bin/python3"
    r = lab.run_in_pod(POD, python, "-c", PROBE, DNS_IP, str(count), *KINDS.values(), timeout=300)
    if r.returncode != 0:
        raise BenchError(f"query probe failed: {r.stderr.strip()[-500:]}")
    raw = json.loads(r.stdout)
    return {
        kind: (sorted(raw[q][0]), "/".join(RCODES.get(c, str(c)) for c in raw[q][1]))
        for kind, q in KINDS.items()
    }


def run_probes(
    lab: Lab, inputs: Inputs, count: int
) -> list[tuple[str, dict[str, tuple[list[float], str]]]]:
    out = [("kube-dns, no agent", probe(lab, count))]
    agent = start_agent(lab, inputs.cluster_yaml, PIN, None, "interceptor", (), WANTED)
    try:
        out.append(("interceptor (default flags)", probe(lab, count)))
    finally:
        stop_agent(agent, PIN)
    if "--no-fastpath" in agent_flags():
        agent = start_agent(
            lab, inputs.cluster_yaml, PIN, None, "interceptor", ("--no-fastpath",), WANTED
        )
        try:
            out.append(("interceptor --no-fastpath", probe(lab, count)))
        finally:
            stop_agent(agent, PIN)
    return out


def probe_table(probes: list[tuple[str, dict[str, tuple[list[float], str]]]]) -> str:
    rows = []
    for kind in KINDS:
        for label, res in probes:
            lat, rcode = res[kind]
            rows.append(
                [kind, label, rcode, fmt_us(percentile(lat, 50)), fmt_us(percentile(lat, 99))]
            )
    return md_table(["query", "answered by", "rcode", "p50 µs", "p99 µs"], rows)


def setups_from_help(flags: str) -> tuple[list[Setup], list[str]]:
    """The agent rows, according to what ``interceptor agent --help`` offers."""
    has_on = re.search(r"(?<![\w-])--autopath\b", flags) is not None
    has_off = "--no-autopath" in flags
    notes = []
    out = [Setup("baseline: no agent (pod -> kube-dns)", None)]
    if has_on:
        out.append(Setup("interceptor, no autopath", ("--no-autopath",) if has_off else ()))
        out.append(Setup("interceptor, autopath", ("--autopath",)))
    else:
        out.append(Setup("interceptor (no autopath flag yet)", ()))
        notes.append("`interceptor agent --help` has no --autopath: the autopath row is missing")
    return out, notes


# ----------------------------------------------------------------------- cached QPS

Starter = Callable[[set[int] | None], Server]


def qps_systems(
    lab: Lab, tmp: Path, inputs: Inputs, coredns: Path | None
) -> list[tuple[str, str, Starter]]:
    """(name, description, start(cpus) -> Server) for every caching forwarder."""

    def ready() -> bool:
        return dig_from_pod(lab, POD, RESOLVER_IP, name("qps", 0)) == [v4("qps", 0)]

    def peer(label: str, cmd: list[str]) -> Starter:
        def start(cpus: set[int] | None) -> Server:
            proc = start_in_node(lab, label, cmd, tmp / f"{label}.log", cpus, ready)
            return Server(label, proc, cmd, RESOLVER_IP)

        return start

    out: list[tuple[str, str, Starter]] = [
        (
            "interceptor",
            "agent (default flags), the pod asks 10.96.0.10, cache and forward to it",
            lambda cpus: start_agent(
                lab, inputs.cluster_yaml, PIN, cpus, "interceptor", (), WANTED
            ),
        ),
    ]
    out += [(name, about, peer(name, cmd)) for name, about, cmd in forwarder_commands(tmp, coredns)]
    return out


@dataclass
class QpsRow:
    name: str
    description: str
    m: Measured
    upstream: int


def run_qps(
    lab: Lab,
    tmp: Path,
    inputs: Inputs,
    log: QueryLog,
    load: Load,
    coredns: Path | None,
    client_cpus: set[int] | None,
    server_cpus: set[int] | None,
) -> list[QpsRow]:
    rows = []
    for label, description, start in qps_systems(lab, tmp, inputs, coredns):
        progress(f"{label}: warming its cache, then {load.duration:g}s of dnsperf")
        server = start(server_cpus)
        try:
            warm = Load(0, 1, 1, 20, runs=1)
            run_dnsperf(lab, POD, label, server.target, inputs.qps_queries, warm, client_cpus, None)
            check_answers(lab, POD, server.target, inputs.qps_expected)
            start_count = log.settled()
            m = run_dnsperf(
                lab,
                POD,
                label,
                server.target,
                inputs.qps_queries,
                load,
                client_cpus,
                server_cpus,
                server_pid=server.proc.pid,
            )
            rows.append(QpsRow(label, description, m, log.settled() - start_count))
        finally:
            if server.agent is not None:
                stop_agent(server, PIN)
            else:
                server.stop()
    return rows


# ------------------------------------------------------------------------------ report


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def per(value: float, n: int) -> str:
    return f"{value / n:.2f}"


def lookup_table(results: list[LookupResult], family: str, n: int) -> str:
    rows = []
    for r in results:
        if r.family != family:
            continue
        c, w = r.cold, r.warm
        rows.append(
            [
                r.setup.label,
                per(c.upstream, n),
                per(w.upstream, n),
                "-" if c.pod_queries is None else f"{c.pod_queries:.2f}",
                "-" if w.pod_queries is None else f"{w.pod_queries:.2f}",
                "-" if w.resolver_queries is None else f"{w.resolver_queries:.2f}",
                "-" if w.kernel_junk is None else f"{w.kernel_junk:.2f}",
                fmt_us(c.p(50)),
                fmt_us(c.p(99)),
                fmt_us(w.p(50)),
                fmt_us(w.p(99)),
                str(len(c.failures) + len(w.failures)),
            ]
        )
    return md_table(
        [
            "setup",
            "kube-dns queries / lookup, cold",
            "warm",
            "pod queries / lookup, cold",
            "warm",
            "resolver woken / lookup, warm",
            "junk NXDOMAIN in the kernel / lookup, warm",
            "cold p50 µs",
            "cold p99 µs",
            "warm p50 µs",
            "warm p99 µs",
            "failed",
        ],
        rows,
    )


def qps_table(rows: list[QpsRow]) -> str:
    by = {r.name: r.m.perf.qps for r in rows}
    me = by.get("interceptor", math.nan)
    out = []
    for r in rows:
        m = r.m
        out.append(
            [
                r.name,
                f"{m.perf.qps:,.0f}",
                f"{me / m.perf.qps:.2f}x" if m.perf.qps else "-",
                f"{m.perf.avg_latency_ms * 1000:.0f}",
                f"{r.upstream:,}",
                f"{m.perf.queries_lost:,}",
                m.limit,
                f"{m.client_busy or 0:.0f}%",
                f"{m.server_busy or 0:.0f}%",
                "-" if m.server_pct is None else f"{m.server_pct:.0f}%",
            ]
        )
    return md_table(
        [
            "system",
            "QPS",
            "interceptor / this",
            "avg latency µs",
            "kube-dns queries during run",
            "lost",
            "limit",
            "client CPU",
            "server CPU",
            "server process",
        ],
        out,
    )


def render(
    args: argparse.Namespace,
    results: list[LookupResult],
    families: list[str],
    probes: list[tuple[str, dict[str, tuple[list[float], str]]]],
    rows: list[QpsRow],
    qps_load: Load,
    notes: list[str],
    background: dict[int, CpuUse],
    loads: tuple[str, str],
    pin_text: str,
) -> str:
    n = args.lookups
    lines = [
        "## External names from a pod with ndots:5 (issue 5)",
        "",
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}; load average before {loads[0]}, after {loads[1]}; "
        f"idle background: {cpu_note(background)}.",
        "",
        "Command: `"
        + " ".join(["sudo .venv/bin/python -m tests.bench.ndots", *sys.argv[1:]])
        + "` (`make bench` runs it with the defaults)",
        "",
        f"Topology: pod netns ──veth── node netns ──veth── kube-dns netns ({DNS_IP}, dnsmasq, "
        f"authoritative for cluster.local and {ZONE}, TTL 300, every query logged).  The pod's "
        "resolv.conf: `search bench.svc.cluster.local svc.cluster.local cluster.local`, "
        f"`options ndots:5`, nameserver {DNS_IP}.  {pin_text}.",
        "",
        f"### glibc lookups of {n} distinct external names (`ext-<i>.{ZONE}`, 2 dots)",
        "",
        "Each name looked up once with `getaddrinfo` (cold: the agent was just started), then "
        "again (warm).  kube-dns queries: what reached kube-dns per lookup (its log); pod "
        "queries: what the pod sent per lookup (the agent's request counters and the fast "
        "path's hits); resolver woken: the queries of those that the resolver process "
        "answered; junk NXDOMAIN in the kernel: search-path expansions answered on the veth "
        '(`interceptor_fastpath_total{result="nxdomain"}`, with `--no-autopath` only).',
    ]
    for family in families:
        what = "AF_INET: A only" if family == "inet" else "AF_UNSPEC: A and AAAA"
        lines += ["", f"{what} (`getaddrinfo(name, family={family.upper()})`):", ""]
        lines.append(lookup_table(results, family, n))
    lines += [
        "",
        "In this lab kube-dns is one veth hop from the node and answers every name from memory "
        "(about 45 µs a query, see below), the best case for the baseline's latency.  In a "
        "cluster kube-dns sits behind its Service, often on another node, and forwards external "
        "names upstream: there every query kept off it saves that round trip, so the query "
        "counts carry over to a cluster while these latencies do not.",
    ]
    breakdown = [
        f"{r.setup.label} / {r.family}: cold "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.cold.upstream_types.items()))
        for r in results
    ]
    lines += ["", "kube-dns queries by type, cold pass: " + "; ".join(breakdown) + "."]
    failures = [f for r in results for f in (r.cold.failures + r.warm.failures)]
    if failures:
        lines.append(f"Failed lookups ({len(failures)}), e.g.: " + "; ".join(failures[:3]))
    lines += [
        "",
        f"What one query costs, by kind ({args.probes} A queries each, 1 ms apart, from the "
        "pod to 10.96.0.10 over raw UDP: no glibc, no search path; the server's CPU goes idle "
        "between queries, as it does between a pod's lookups):",
        "",
        probe_table(probes),
    ]
    if rows:
        ql = qps_load
        lines += [
            "",
            f"### Cached answers: {args.qps_names} external names, all in cache",
            "",
            f"`dnsperf -c {ql.clients} -T {ql.threads} -q {ql.outstanding} -l {ql.duration:g}` "
            f"from the pod, `qps-<i>.{ZONE} A`; each cache warmed with one pass and every "
            "answer checked first.",
            "",
            qps_table(rows),
            "",
            "Caching forwarders: " + "; ".join(f"{r.name}: {r.description}" for r in rows) + ".",
        ]
        for r in rows:
            if r.m.limit in ("client", "both"):
                lines.append(
                    f"- {r.name}: the client CPU was {r.m.client_busy:.0f}% busy: "
                    f"{r.m.perf.qps:,.0f} QPS is a lower bound of the server's capacity."
                )
    lines += [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.ndots",
        description="ndots:5 lookups through glibc with and without the interceptor, and "
        "cached-answer QPS against dnsmasq, unbound and CoreDNS as caching forwarders.",
    )
    p.add_argument("--lookups", type=positive, default=300, help="distinct names per family")
    p.add_argument(
        "--probes", type=positive, default=300, help="single queries per kind (default 300)"
    )
    p.add_argument("--qps-names", type=positive, default=1000, help="names in the QPS mix")
    p.add_argument("--seconds", type=positive, default=10, help="seconds per dnsperf run")
    p.add_argument("--clients", type=positive, default=4, help="dnsperf -c")
    p.add_argument("--threads", type=positive, default=2, help="dnsperf -T")
    p.add_argument("--outstanding", type=positive, default=100, help="dnsperf -q")
    p.add_argument(
        "--families",
        default="inet,unspec",
        help="address families for the lookups: inet, unspec or both (default)",
    )
    p.add_argument("--skip-qps", action="store_true", help="only the glibc lookups")
    p.add_argument("--skip-coredns", action="store_true", help="no CoreDNS row in the QPS part")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "bench",
        help="where ndots.md goes (default: docs/bench)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    for tool in ("dnsperf", "dig", "nsenter", "taskset"):
        require_tool(tool)
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, BPF)")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in ("inet", "unspec") for f in families):
        raise BenchError("--families: inet, unspec or inet,unspec")
    if max(args.lookups, args.qps_names) > 60_000:
        raise BenchError("--lookups/--qps-names: at most 60000")
    setups, notes = setups_from_help(agent_flags())
    client_cpus, server_cpus = cpu_plan()
    pin_text = (
        "The lookups run unpinned (one at a time, as on a node); for the QPS runs dnsperf is "
        f"pinned to CPU {min(client_cpus)}, the agent and the forwarders to CPU "
        f"{min(server_cpus)}; kube-dns is never pinned"
        if client_cpus and server_cpus
        else "Nothing is pinned (fewer than 2 CPUs)"
    )
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ndots-"))
    tmp.chmod(0o755)  # dnsmasq reads its hosts file as nobody
    lab = Lab(f"bn{os.getpid() % 10000}", [PodSpec(POD, POD_IP, NAMESPACE)])
    log = QueryLog(tmp / "kube-dns.log")
    try:
        inputs = write_inputs(tmp, args.lookups, args.qps_names)
        lab.up()
        add_node_local_address(lab)
        upstream = lab.start_upstream(
            "--local=/cluster.local/",
            f"--local=/{ZONE}/",
            f"--addn-hosts={inputs.hosts}",
            "--local-ttl=300",
            log=log.path,
        )
        background = background_load()
        # Lookups run unpinned, as on a real node: one query at a time leaves the CPUs idle,
        # and waking an idle vCPU pinned elsewhere costs tens of µs per query on a VM,
        # which would be measured instead of the DNS path.
        results = run_lookups(lab, inputs, setups, families, log, None, None)
        progress(f"single queries: {args.probes} of each kind, one at a time")
        probes = run_probes(lab, inputs, args.probes)
        rows: list[QpsRow] = []
        qps_load = Load(args.seconds, args.clients, args.threads, args.outstanding)
        if not args.skip_qps:
            coredns = None if args.skip_coredns else coredns_binary()
            if coredns is None and not args.skip_coredns:
                notes.append("CoreDNS could not be built (no Go toolchain?): its row is missing")
            rows = run_qps(lab, tmp, inputs, log, qps_load, coredns, client_cpus, server_cpus)
        stop(upstream)
        text = render(
            args,
            results,
            families,
            probes,
            rows,
            qps_load,
            notes,
            background,
            (load_before, load_average()),
            pin_text,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ndots.md").write_text(text)
        print(text)
        print(f"written: {args.out / 'ndots.md'}")
        return 0
    finally:
        lab.down()
        # kube-dns's dnsmasq drops root before exiting and cannot remove its pid file.
        Path(f"/run/{lab.prefix}-dnsmasq.pid").unlink(missing_ok=True)
        shutil.rmtree(PIN, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    try:
        return run(args)
    except BenchError as exc:
        progress(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        progress("interrupted; everything stopped")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

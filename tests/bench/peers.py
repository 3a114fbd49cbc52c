"""Issue 7: the interceptor against dnsmasq, unbound and CoreDNS as the node-local DNS server
for the same cluster names, side by side in one run, with the same dnsperf load from a pod.
Needs root.

    .venv/bin/python -m tests.bench.peers [--seconds 10] [--rounds 1] [--out docs/bench]

Every system serves the same ClusterIP Services (``svc-<i>.bench.svc.cluster.local``):

* dnsmasq from a hosts file, unbound from ``local-data``, CoreDNS through its ``kubernetes``
  plugin watching a real kube-apiserver that holds those Services (the e2e one, built by
  scripts/build-peers.sh; ``--coredns-source file`` or a missing apiserver: its ``file``
  plugin with a zone generated from the same list);
* the interceptor's agent from a YAML file of the same Services, once with the in-kernel
  fast path and once without (``--no-fastpath``: userspace only), if the agent has the flag.

``--workload cached`` asks external names instead (``ext-<i>.example.test``, TTL 300, served
by an origin dnsmasq at the kube-dns address), every system a caching forwarder to it:
dnsmasq ``--server``, unbound ``forward-zone``, CoreDNS ``forward`` + ``cache``, and the agent
(which forwards to the server the pod asked), once with hot cached names answered in the
kernel (the default) and once without (``--fastpath-cached=0``).  The caches are warmed
before each measurement, and queries that reached the origin during it are counted.

Two phases: the highest QPS each system sustains (dnsperf with many queries in flight), then
latency percentiles at one fixed rate every system sustained (half the lowest maximum, unless
``--rate``), from dnsperf's per-query log (``-v``).  Before any measurement every system must
answer every name with exactly its address (checked from the pod with dnspython).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from devlab.netns import DNS_IP, RESOLVER_IP, Lab, PodSpec
from tests.bench.blast import blast_binary
from tests.bench.common import BenchError, pinning, positive, require_tool
from tests.bench.nodelocal import (
    ROOT,
    CpuUse,
    Load,
    Measured,
    Server,
    add_node_local_address,
    agent_flags,
    background_load,
    best_of,
    check_answers,
    coredns_binary,
    coredns_command,
    cpu_note,
    cpu_plan,
    dig_from_pod,
    dnsmasq_command,
    fmt_us,
    forwarder_commands,
    load_average,
    md_table,
    percentile,
    ratio_text,
    run_dnsperf,
    start_agent,
    start_in_node,
    stop_agent,
    unbound_command,
    write_expected,
)

NAMESPACE = "bench"
POD, POD_IP = "bench", "10.244.1.10"
PIN = Path("/sys/fs/bpf/bench-peers")
FASTPATH_FLAG = "--no-fastpath"
WANTED = {
    "fast-path hits": 'interceptor_fastpath_total{result="hit"',
    "userspace answers": "interceptor_requests_total",
}

# Found by sweeping -c 1..4, -T 1..2, -q 20..200 from the pod on the 2-core VM: see the
# README.  More in flight only adds queueing; fewer leaves a fast server idle.
DEFAULT_CLIENTS, DEFAULT_THREADS, DEFAULT_OUTSTANDING = 4, 2, 100
DEFAULT_RATE = 10_000


ORIGIN_ZONE = "example.test"


def ext_name(i: int) -> str:
    return f"ext-{i}.{ORIGIN_ZONE}"


def ext_ip(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}"


def service_ip(i: int) -> str:
    """Inside the e2e apiserver's 10.96.0.0/16, clear of 10.96.0.1 and the kube-dns IP."""
    return f"10.96.{100 + i // 250}.{i % 250 + 1}"


def fqdn(i: int) -> str:
    return f"svc-{i}.{NAMESPACE}.svc.cluster.local"


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": service_ip(i),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }


@dataclass(frozen=True)
class Inputs:
    """Every server's data and dnsperf's queries, generated from one list of Services."""

    names: int
    cluster_yaml: Path
    hosts: Path
    unbound_body: str
    zonefile: Path
    queries: Path
    expected: Path
    workload: str = "cluster"
    origin_hosts: Path | None = None
    """cached: the origin's hosts file (what kube-dns serves)."""
    origin_log: Path | None = None

    @property
    def first(self) -> tuple[str, str]:
        """The first name asked and its address: a started system is ready when it answers."""
        return (ext_name(0), ext_ip(0)) if self.workload == "cached" else (fqdn(0), service_ip(0))

    def origin_queries(self) -> int:
        """Queries the origin has logged so far (cache misses of the system under test)."""
        if self.origin_log is None or not self.origin_log.exists():
            return 0
        return sum(" from " in ln and "query[" in ln for ln in self.origin_log.open())


def write_inputs(tmp: Path, names: int, workload: str = "cluster") -> Inputs:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "namespace": NAMESPACE},
        "spec": {"nodeName": "node-1"},
        "status": {"podIP": POD_IP, "podIPs": [{"ip": POD_IP}]},
    }
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    cluster = tmp / "cluster.yaml"
    items = [ns, pod, *(service(i) for i in range(names))]
    cluster.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    hosts = tmp / "hosts"
    hosts.write_text("".join(f"{service_ip(i)} {fqdn(i)}\n" for i in range(names)))
    unbound = '  local-zone: "cluster.local." static\n' + "".join(
        f'  local-data: "{fqdn(i)}. 30 IN A {service_ip(i)}"\n' for i in range(names)
    )
    zone = tmp / "db.cluster.local"
    zone.write_text(
        "$ORIGIN cluster.local.\n"
        "@ 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30\n"
        "@ 30 IN NS ns.dns.cluster.local.\n"
        f"ns.dns 30 IN A {DNS_IP}\n"
        + "".join(f"svc-{i}.{NAMESPACE}.svc 30 IN A {service_ip(i)}\n" for i in range(names))
    )
    queries = tmp / "queries.txt"
    queries.write_text("".join(f"{fqdn(i)} A\n" for i in range(names)))
    if workload == "cached":
        origin = tmp / "origin-hosts"
        origin.write_text("".join(f"{ext_ip(i)} {ext_name(i)}\n" for i in range(names)))
        queries.write_text("".join(f"{ext_name(i)} A\n" for i in range(names)))
        expected = write_expected(
            tmp / "expected.json", [(ext_name(i), ext_ip(i)) for i in range(names)]
        )
        return Inputs(
            names,
            cluster,
            hosts,
            unbound,
            zone,
            queries,
            expected,
            workload,
            origin,
            tmp / "origin.log",
        )
    expected = write_expected(
        tmp / "expected.json", [(fqdn(i), service_ip(i)) for i in range(names)]
    )
    return Inputs(names, cluster, hosts, unbound, zone, queries, expected)


# ---------------------------------------------------------------------- kube-apiserver


@contextmanager
def kube_api(lab: Lab, tmp: Path, names: int) -> Iterator[Path]:
    """The e2e kube-apiserver (with etcd) holding the same Services, reachable from the node
    namespace through the e2e relays (a Unix socket: the node gets no route out); yields a
    kubeconfig for CoreDNS's kubernetes plugin."""
    from tests.e2e.apiserver import ADMIN_TOKEN, Cluster
    from tests.e2e.relay import start_relays

    cluster = Cluster(tmp / "kube")
    relays: list[subprocess.Popen[str]] = []
    try:
        cluster.start()
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        with ThreadPoolExecutor(8) as pool:  # one TLS request per Service: in parallel
            list(
                pool.map(
                    lambda i: cluster.raw("POST", path_of(service(i)), service(i)), range(names)
                )
            )
        try:
            relays += start_relays(lab.node, cluster.api_port, tmp / "api.sock")
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        yield cluster.kubeconfig(ADMIN_TOKEN, tmp / "kubeconfig")
    finally:
        for proc in relays:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.stop()


def path_of(obj: dict[str, Any]) -> str:
    from tests.e2e.apiserver import collection_path

    return collection_path(obj)


# ------------------------------------------------------------------------------ systems


@dataclass
class System:
    name: str
    peer: bool
    start: Callable[[set[int] | None], Server]
    """Start it pinned to the given CPUs (None: unpinned) and wait until it answers."""
    stop: Callable[[Server], None]
    description: str


def systems(
    lab: Lab,
    tmp: Path,
    inputs: Inputs,
    coredns: tuple[Path, Path | None] | None,
    fastpath: bool,
) -> list[System]:
    """The systems under test, each a start/stop pair: the same node-local address for the
    peers, the agent's BPF redirect for the interceptor."""

    def first_name_ready() -> bool:
        first, address = inputs.first
        return dig_from_pod(lab, POD, RESOLVER_IP, first) == [address]

    def peer(name: str, cmd: list[str], cpus: set[int] | None) -> Server:
        proc = start_in_node(lab, name, cmd, tmp / f"{name}.log", cpus, first_name_ready)
        return Server(name, proc, cmd, RESOLVER_IP)

    def agent(name: str, extra: tuple[str, ...]) -> System:
        return System(
            name,
            False,
            lambda cpus: start_agent(lab, inputs.cluster_yaml, PIN, cpus, name, extra, WANTED),
            lambda s: stop_agent(s, PIN),
            "agent, --source cluster.yaml, BPF on the pod's veth"
            + (f", {' '.join(extra)}" if extra else ""),
        )

    if inputs.workload == "cached":
        return forwarders(tmp, coredns, peer) + [
            agent(FAST, ()),
            agent(USER, (CACHED_FLAG,)),
        ]

    dnsmasq = dnsmasq_command(
        tmp,
        "dnsmasq",
        f"--addn-hosts={inputs.hosts}",
        "--local=/cluster.local/",
        "--local-ttl=30",
        "--cache-size=10000",
    )
    unbound = unbound_command(tmp, "unbound", inputs.unbound_body)
    out = [
        System(
            "dnsmasq",
            True,
            lambda cpus: peer("dnsmasq", dnsmasq, cpus),
            Server.stop,
            "hosts file (--addn-hosts), --local=/cluster.local/",
        ),
        System(
            "unbound",
            True,
            lambda cpus: peer("unbound", unbound, cpus),
            Server.stop,
            'local-zone "cluster.local." static + local-data, 1 thread',
        ),
    ]
    if coredns is not None:
        binary, kubeconfig = coredns
        if kubeconfig is not None:
            source = "kubernetes plugin"
            body = (
                "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n"
                f"        kubeconfig {kubeconfig} e2e\n"
                "        pods insecure\n"
                "        ttl 30\n"
                "    }\n    cache 30\n"
            )
        else:
            source = "file plugin"
            body = f"    file {inputs.zonefile} cluster.local\n    cache 30\n"
        cmd = coredns_command(binary, tmp, "coredns", body)
        out.append(
            System(
                "CoreDNS",
                True,
                lambda cpus: peer("CoreDNS", cmd, cpus),
                Server.stop,
                f"{binary.name}, {source}, cache 30 (as kubeadm's Corefile)",
            )
        )

    if fastpath:
        out.append(agent(FAST, ()))
        out.append(agent(USER, (FASTPATH_FLAG,)))
    else:
        out.append(agent(USER, ()))
    return out


def forwarders(
    tmp: Path,
    coredns: tuple[Path, Path | None] | None,
    peer: Callable[[str, list[str], set[int] | None], Server],
) -> list[System]:
    """The peers as caching forwarders to the origin (kube-dns's address)."""
    binary = coredns[0] if coredns is not None else None
    return [
        System(name, True, partial(peer, name, cmd), Server.stop, about)
        for name, about, cmd in forwarder_commands(tmp, binary)
    ]


@dataclass(frozen=True)
class Phase:
    """One pass over every system with the same load and CPU placement."""

    key: str
    load: Load
    client_cpus: set[int] | None
    server_cpus: set[int] | None


def measure(lab: Lab, system: System, inputs: Inputs, phase: Phase) -> Measured:
    """Start, check every answer, warm up, measure, stop."""
    progress(f"{system.name}: starting ({phase.key})")
    server = system.start(phase.server_cpus)
    try:
        check_answers(lab, POD, server.target, inputs.expected)
        # Cached names: enough passes for every cache to hold every name, and for the agent
        # to have handed its hot ones to the kernel (--fastpath-cached-hits, then a turn).
        cached = inputs.workload == "cached"
        warm = Load(0, 1, 1, 20, runs=6 if cached else 2, tool=phase.load.tool)
        run_dnsperf(
            lab, POD, system.name, server.target, inputs.queries, warm, phase.client_cpus, None
        )
        if cached:
            time.sleep(1.0)
        progress(f"{system.name}: {phase.key} for {phase.load.duration:g}s")
        origin_before = inputs.origin_queries()
        measured = run_dnsperf(
            lab,
            POD,
            system.name,
            server.target,
            inputs.queries,
            phase.load,
            phase.client_cpus,
            phase.server_cpus,
            server_pid=server.proc.pid,
            counters=server.counters,
        )
        if cached:
            measured.counters["origin queries"] = inputs.origin_queries() - origin_before
        return measured
    finally:
        system.stop(server)


def run_phase(
    lab: Lab, chosen: list[System], inputs: Inputs, phase: Phase, rounds: int
) -> dict[str, Measured]:
    """Every system in turn, ``rounds`` times, rotating the order so drift on a shared
    machine does not always hit the same system; one merged row per system."""
    runs: dict[str, list[Measured]] = {s.name: [] for s in chosen}
    for rnd in range(rounds):
        k = rnd % len(chosen)
        for s in chosen[k:] + chosen[:k]:
            runs[s.name].append(measure(lab, s, inputs, phase))
    return {n: best_of(ms, phase.load.rate is not None) for n, ms in runs.items()}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ report

FAST, USER = "interceptor (fast path)", "interceptor (userspace)"
CACHED_FLAG = "--fastpath-cached=0"


@dataclass
class Report:
    args: argparse.Namespace
    systems: list[System]
    pinned: dict[str, Measured]
    unpinned: dict[str, Measured]
    fixed: dict[str, Measured]
    rate: int
    background: dict[int, CpuUse]
    load_before: str
    load_after: str
    coredns_note: str
    fastpath: bool
    phases: dict[str, Phase]
    offer_qps: float | None = None
    """What the client alone can send per second on its CPU (dnsblast -O to a socket in the
    pod that reads nothing): the ceiling it puts on any row."""

    def peers(self) -> list[str]:
        return [s.name for s in self.systems if s.peer]

    def best_peer(self, runs: dict[str, Measured]) -> tuple[str, float]:
        if not runs:
            return "-", math.nan
        name = max(self.peers(), key=lambda n: runs[n].perf.qps)
        return name, runs[name].perf.qps

    def pct(self, name: str, p: float) -> float:
        return percentile(self.fixed[name].latencies_us, p)

    def best_peer_pct(self, p: float) -> float:
        return min(self.pct(n, p) for n in self.peers())


def limit_text(m: Measured) -> str:
    lim = m.limit
    if lim == "client":
        return f"client ({m.client_busy:.0f}% CPU)"
    if lim == "server":
        return f"server ({m.server_busy:.0f}% CPU)"
    if lim == "both":
        return "both CPUs"
    return lim


def throughput_table(r: Report) -> str:
    _, best = r.best_peer(r.pinned)
    _, best_u = r.best_peer(r.unpinned)
    headers = ["system", "max QPS", "vs best peer", "limit", "CPU µs / answer"]
    if r.unpinned:
        headers += ["max QPS, CPUs shared", "vs best peer"]
    rows = []
    for s in r.systems:
        m = r.pinned[s.name]
        row = [
            s.name,
            f"{m.perf.qps:,.0f}",
            ratio_text(m.perf.qps, best),
            limit_text(m),
            f"{m.cpu_us_per_answer:.1f}",
        ]
        if r.unpinned:
            u = r.unpinned[s.name]
            row += [f"{u.perf.qps:,.0f}", ratio_text(u.perf.qps, best_u)]
        rows.append(row)
    return md_table(headers, rows)


def latency_table(r: Report) -> str:
    best99 = r.best_peer_pct(99)
    rows = []
    for s in r.systems:
        fx = r.fixed[s.name]
        rows.append(
            [
                s.name,
                fmt_us(r.pct(s.name, 50)),
                fmt_us(r.pct(s.name, 90)),
                fmt_us(r.pct(s.name, 99)),
                fmt_us(r.pct(s.name, 99.9)),
                ratio_text(r.pct(s.name, 99), best99),
                f"{fx.perf.avg_latency_ms * 1000:.1f}",
                f"{fx.perf.queries_completed:,}",
                f"{fx.lost_in_all_rounds:,}",
                f"{fx.perf.dnsperf_cpu_pct or 0:.0f}%",
                f"{fx.other_pct:.0f}%",
            ]
        )
    return md_table(
        [
            "system",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "p99 vs best peer",
            f"{r.args.client} avg µs",
            "answers",
            "lost",
            f"{r.args.client} CPU",
            "other CPU",
        ],
        rows,
    )


def cpu_table(r: Report) -> str:
    rows = []
    for s in r.systems:
        m = r.pinned[s.name]
        srv = "-" if m.server_pct is None else f"{m.server_pct:.0f}%"
        soft = " / ".join(f"{m.cpu[c].softirq_pct:.0f}%" for c in sorted(m.cpu))
        hits = m.counters.get("fast-path hits")
        if "origin queries" in m.counters:
            soft += f" ({int(m.counters['origin queries']):,} origin queries)"
        rows.append(
            [
                s.name,
                f"{m.client_busy or 0:.0f}%",
                f"{m.perf.dnsperf_cpu_pct or 0:.0f}%",
                f"{m.server_busy or 0:.0f}%",
                srv,
                soft,
                "-" if hits is None else f"{hits / max(1, m.perf.queries_completed):.0%}",
                f"{m.other_pct:.0f}%",
                f"{m.response_bytes:.0f}",
                f"{m.lost_in_all_rounds:,}",
                rcodes(m),
            ]
        )
    return md_table(
        [
            "system",
            "client CPU",
            f"{r.args.client} process",
            "server CPU",
            "server process",
            "softirq CPU0 / CPU1",
            "fast-path hits",
            "other CPU",
            "response bytes",
            "lost",
            "rcodes",
        ],
        rows,
    )


def rcodes(m: Measured) -> str:
    text = f"NOERROR {m.perf.noerror:,}"
    return text if m.perf.other_rcodes == "-" else f"{text}; {m.perf.other_rcodes}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def cached_target_lines(r: Report) -> list[str]:
    """Issue 14's targets for cached external names."""
    out = []
    for name, what in ((FAST, "hot names in the kernel"), (USER, "userspace cache only")):
        if name not in r.pinned:
            continue
        if r.unpinned:
            ub_name, ub = r.best_peer(r.unpinned)
            q = r.unpinned[name].perf.qps / ub
            target = f"; target >= 1.5x: {verdict(q >= 1.5)}" if name == FAST else ""
            out.append(
                f"- {name} ({what}), max QPS with both CPUs shared: {q:.2f}x the best peer "
                f"({ub_name}){target}"
            )
        lat = r.pct(name, 99) / r.best_peer_pct(99)
        target = f"; target <= 0.25x: {verdict(lat <= 0.25)}" if name == FAST else ""
        out.append(f"- {name} p99 at {r.rate:,} QPS: {lat:.2f}x the best peer's p99{target}")
    if "dnsmasq" in r.pinned and USER in r.pinned:
        user = r.pinned[USER].perf.qps / r.pinned["dnsmasq"].perf.qps
        out.append(
            f"- userspace cache max QPS, pinned: {user:.2f}x dnsmasq; target >= 1.0x: "
            f"{verdict(user >= 1.0)}"
        )
    misses = {n: m.counters.get("origin queries", 0) for n, m in r.pinned.items()}
    out.append(
        "- queries that reached the origin during the pinned max-QPS runs (cache misses): "
        + ", ".join(f"{n} {int(v):,}" for n, v in misses.items())
    )
    return out


def target_lines(r: Report) -> list[str]:
    if r.args.workload == "cached":
        return cached_target_lines(r)
    best_name, best_qps = r.best_peer(r.pinned)
    out = []
    if r.fastpath and FAST in r.pinned:
        m = r.pinned[FAST]
        q = m.perf.qps / best_qps
        bound = " (a lower bound: its client CPU was full)" if m.limit in ("client", "both") else ""
        out.append(f"- fast path max QPS, pinned: {q:.2f}x the best peer ({best_name}){bound}")
        if r.unpinned:
            ub_name, ub = r.best_peer(r.unpinned)
            qu = r.unpinned[FAST].perf.qps / ub
            out.append(
                f"- fast path max QPS, both CPUs shared: {qu:.2f}x the best peer ({ub_name}); "
                f"target >= 2x: {verdict(qu >= 2)}"
            )
            if r.offer_qps:
                k = r.offer_qps / r.unpinned[FAST].perf.qps
                out.append(
                    f"- the client alone offers {r.offer_qps:,.0f} queries/s on one CPU: "
                    f"{k:.1f}x the fast path's QPS with both CPUs; target >= 3x: "
                    f"{verdict(k >= 3)}"
                )
        lat = r.pct(FAST, 99) / r.best_peer_pct(99)
        out.append(
            f"- fast path p99 at {r.rate:,} QPS: {lat:.2f}x the best peer's p99; "
            f"target <= 0.1x: {verdict(lat <= 0.1)}"
        )
    else:
        out.append(
            f"- fast path: not available yet (`interceptor agent --help` has no {FASTPATH_FLAG});"
            " the agent ran once, userspace only"
        )
    if "dnsmasq" in r.pinned:
        user = r.pinned[USER].perf.qps / r.pinned["dnsmasq"].perf.qps
        out.append(
            f"- userspace max QPS, pinned: {user:.2f}x dnsmasq; target >= 0.5x: "
            f"{verdict(user >= 0.5)}"
        )
    return out


def client_notes(r: Report) -> list[str]:
    out = []
    for s in r.systems:
        m = r.pinned[s.name]
        if m.limit in ("client", "both"):
            kernel = (
                ", the in-kernel answers included: they are computed in its send calls"
                if s.name == FAST
                else ""
            )
            out.append(
                f"- {s.name}: the client CPU was {m.client_busy:.0f}% busy in the pinned max-QPS "
                f"run ({r.args.client}'s process {m.perf.dnsperf_cpu_pct or 0:.0f}%, with the "
                f"kernel's packet work done in its system calls{kernel}): {m.perf.qps:,.0f} QPS "
                "is what the client could send, a lower bound of the server's capacity"
            )
        elif m.limit == "neither":
            out.append(
                f"- {s.name}: neither CPU was saturated in the pinned max-QPS run (client "
                f"{m.client_busy:.0f}%, server {m.server_busy:.0f}%): latency-bound at this many "
                "queries in flight, or the machine was busy"
            )
        fx = r.fixed[s.name]
        if fx.lost_in_all_rounds:
            out.append(f"- {s.name}: {fx.lost_in_all_rounds} queries lost at the fixed rate")
        for phase, run in (("max-QPS", m), ("fixed-rate", fx)):
            if run.other_pct > 15:
                out.append(
                    f"- {s.name}: other work used about {run.other_pct:.0f}% of a CPU during "
                    f"its {phase} run: the machine was shared, so that row is pessimistic"
                )
        if (fx.perf.dnsperf_cpu_pct or 0) > 70:
            out.append(
                f"- {s.name}: {r.args.client} used {fx.perf.dnsperf_cpu_pct:.0f}% of its CPU at "
                "the fixed rate; its own scheduling may show in the latency tail"
            )
    return out


def render(r: Report, plot: Path | None) -> str:
    a = r.args
    pinned, fixed = r.phases["pinned"], r.phases["fixed"]
    ml, fl = pinned.load, fixed.load
    pin = (
        f"{r.args.client} pinned to CPU {min(pinned.client_cpus)}, every server to CPU "
        f"{min(pinned.server_cpus)}"
        if pinned.client_cpus and pinned.server_cpus
        else "no CPU pinning"
    )
    cached = a.workload == "cached"
    asked = (
        f"{a.names:,} external names, `ext-<i>.{ORIGIN_ZONE} A` (TTL 300), every system a "
        f"caching forwarder to the origin at {DNS_IP} (a dnsmasq), each cache warmed before "
        "it is measured"
        if cached
        else f"{a.names:,} Services, `svc-<i>.bench.svc.cluster.local A`"
    )
    lines = [
        (
            "## Cached external names: interceptor vs dnsmasq, unbound, CoreDNS as caching "
            "forwarders (issue 14)"
            if cached
            else "## Node-local DNS: interceptor vs dnsmasq, unbound, CoreDNS (issue 7)"
        ),
        "",
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}; load average before {r.load_before}, after "
        f"{r.load_after}; idle background before the runs: {cpu_note(r.background)}.",
        "",
        "Command: `"
        + " ".join(["sudo .venv/bin/python -m tests.bench.peers", *sys.argv[1:]])
        + "` (`make bench` runs it with the defaults)",
        "",
        "Topology: pod netns ──veth── node netns.  Every server runs in the node netns on "
        f"{RESOLVER_IP}:53 (on lo), {pin}.  Peers: the pod asks {RESOLVER_IP}, as with "
        f"NodeLocal DNSCache.  Interceptor: the pod asks the kube-dns ClusterIP {DNS_IP}, as "
        "pods do; tc on the veth steers the query to the agent, or the fast path answers it "
        f"in the kernel.  Queries: {asked}; "
        "every system's answer to every name is checked (dnspython, from the pod) before it "
        "is measured.",
        "",
        f"Max QPS: `{r.args.client} -c {ml.clients} -T {ml.threads} -q {ml.outstanding} -l "
        f"{ml.duration:g}` from the pod"
        + (
            "; again with nothing pinned (client, kernel and server share both CPUs: the "
            "whole machine's answer rate)"
            if r.unpinned
            else ""
        )
        + f".  Latency: `{r.args.client} -Q {r.rate} -c {fl.clients} -T {fl.threads} -q "
        f"{fl.outstanding} -l {fl.duration:g} -v` (each query's latency, µs resolution), "
        + ("the rate given" if a.rate else "a rate every system sustained")
        + (
            f"; {a.rounds} rounds in rotating order, each row the least disturbed round (highest"
            " QPS; for latency the round with the least other CPU)"
            if a.rounds > 1
            else ""
        )
        + ".",
        "",
        "Throughput (CPU µs / answer: busy time of both CPUs per answered query, whoever "
        "spent it):",
        "",
        throughput_table(r),
        "",
        f"Latency at {r.rate:,} QPS:",
        "",
        latency_table(r),
        "",
        "Targets:",
        *target_lines(r),
        "",
        f"Where the CPU went in the pinned max-QPS run (client = {r.args.client}'s CPU, server = "
        "the server's CPU; busy includes the kernel's packet work on that CPU):",
        "",
        cpu_table(r),
        "",
        *client_notes(r),
        "",
        "Peers: " + "; ".join(f"{s.name}: {s.description}" for s in r.systems) + ".",
        f"CoreDNS: {r.coredns_note}.",
        "",
        CLIENT_NOTES.get(r.args.client, ""),
    ]
    if plot is not None:
        lines += ["", f"![latency distributions at {r.rate:,} QPS]({plot.name})"]
    return "\n".join(lines) + "\n"


def write_plot(r: Report, path: Path) -> Path | None:
    """Latency CDF (log x) and the tail (1 - CDF, log-log) per system at the fixed rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (dev extras): no plot")
        return None
    fig, (cdf, tail) = plt.subplots(1, 2, figsize=(12, 4.8))
    for s in r.systems:
        lat = r.fixed[s.name].latencies_us
        if not lat:
            continue
        n = len(lat)
        ys = [(i + 1) / n for i in range(n)]
        style = "-" if s.peer else "--"
        cdf.plot(lat, ys, style, label=s.name, linewidth=1.5)
        tail.plot(lat, [max(1 - y, 0.5 / n) for y in ys], style, label=s.name, linewidth=1.5)
    cdf.set_xscale("log")
    cdf.set_xlabel("latency (µs, log scale)")
    cdf.set_ylabel("fraction of queries answered")
    cdf.set_title(f"Latency CDF at {r.rate:,} QPS ({r.args.client} -v from a pod)")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right", fontsize=8)
    tail.set_xscale("log")
    tail.set_yscale("log")
    tail.set_xlabel("latency (µs, log scale)")
    tail.set_ylabel("fraction slower (1 - CDF, log scale)")
    tail.set_title("Tail: p99 at 1e-2, p99.9 at 1e-3")
    for y in (1e-2, 1e-3):
        tail.axhline(y, color="grey", linewidth=0.6, linestyle=":")
    tail.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.peers",
        description="The interceptor (fast path and userspace) against dnsmasq, unbound and "
        "CoreDNS as node-local DNS for the same cluster names, from a pod.",
    )
    p.add_argument("--seconds", type=positive, default=10, help="seconds per dnsperf run")
    p.add_argument(
        "--client",
        choices=("dnsblast", "dnsperf"),
        default="dnsblast",
        help="load generator (default dnsblast: sendmmsg, not the bottleneck)",
    )
    p.add_argument(
        "--rounds", type=positive, default=1, help="repeat every phase, keep the best round"
    )
    p.add_argument("--names", type=positive, default=1000, help="Services served and asked")
    p.add_argument(
        "--workload",
        choices=("cluster", "cached"),
        default="cluster",
        help="cluster names served from the service map, or external names every system "
        "caches from an origin (peers.md or peers-cached.md)",
    )
    p.add_argument(
        "--rate",
        type=positive,
        help=f"fixed QPS for latency (default: {DEFAULT_RATE:,}, or "
        "half the lowest max QPS if that is lower)",
    )
    p.add_argument("--clients", type=positive, default=DEFAULT_CLIENTS, help="dnsperf -c")
    p.add_argument("--threads", type=positive, default=DEFAULT_THREADS, help="dnsperf -T")
    p.add_argument("--outstanding", type=positive, default=DEFAULT_OUTSTANDING, help="dnsperf -q")
    p.add_argument(
        "--coredns-source",
        choices=("auto", "kubernetes", "file"),
        default="auto",
        help="CoreDNS's kubernetes plugin on the e2e kube-apiserver, or its file plugin "
        "(auto: kubernetes if the apiserver can be built and started)",
    )
    p.add_argument("--skip", default="", help="comma-separated peers to leave out (e.g. coredns)")
    p.add_argument(
        "--no-unpinned", dest="unpinned", action="store_false", help="skip the unpinned max QPS"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "bench",
        help="where peers.md and latency.png go (default: docs/bench)",
    )
    return p


SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
time.sleep(float(sys.argv[1]))
"""


def client_offer(
    lab: Lab, client: str, tool: str, inputs: Inputs, cpus: set[int] | None, seconds: float
) -> float | None:
    """dnsblast -O (send only) from the pod to a socket there that reads nothing, on the
    client's CPU: how many queries a second the client can offer at all.  None for dnsperf,
    which has no such mode."""
    if client != "dnsblast":
        return None
    sink = subprocess.Popen(
        ["ip", "netns", "exec", lab.pod_ns(POD), sys.executable, "-c", SINK, str(seconds + 30)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        cmd = ["ip", "netns", "exec", lab.pod_ns(POD), tool, "-s", "127.0.0.1", "-p", port]
        cmd += ["-d", str(inputs.queries), "-l", f"{seconds:g}", "-c", "4", "-O"]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
            preexec_fn=pinning(cpus),
        )
        m = re.search(r"Queries sent per second:\s*([0-9.]+)", out.stdout)
        return float(m.group(1)) if m else None
    finally:
        sink.kill()
        sink.wait()


CLIENT_NOTES = {
    "dnsblast": (
        "Client: dnsblast (`tests/bench/dnsblast.c`, built by `tests/bench/blast.py`): "
        "dnsperf's options and report, but 64 queries per sendmmsg/recvmmsg call from "
        "queries encoded once, so the client costs far less CPU per query than dnsperf's "
        "(about 7 µs here) and the server, not the client, sets the pace."
    ),
}


def run(args: argparse.Namespace) -> int:
    for tool in ("dig", "nsenter") + (("dnsperf",) if args.client == "dnsperf" else ()):
        require_tool(tool)
    tool = "dnsperf" if args.client == "dnsperf" else str(blast_binary())
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, BPF)")
    if args.names > 38_000:
        raise BenchError("--names: at most 38000 (10.96.100.0 - 10.96.255.255)")
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    fastpath = FASTPATH_FLAG in agent_flags()
    if not fastpath:
        progress(
            f"note: `interceptor agent --help` has no {FASTPATH_FLAG}: the fast-path row is "
            "not available yet; the agent runs once (userspace)"
        )
    client_cpus, server_cpus = cpu_plan()
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    tmp.chmod(0o755)  # dnsmasq reads its hosts file as nobody
    lab = Lab(f"bp{os.getpid() % 10000}", [PodSpec(POD, POD_IP, NAMESPACE)])
    try:
        inputs = write_inputs(tmp, args.names, args.workload)
        lab.up()
        add_node_local_address(lab)
        if inputs.origin_hosts is not None:
            # kube-dns is the origin of the external names: every cache's upstream.
            lab.start_upstream(
                "--local=/cluster.local/",
                f"--local=/{ORIGIN_ZONE}/",
                f"--addn-hosts={inputs.origin_hosts}",
                "--local-ttl=300",
                log=inputs.origin_log,
            )
        else:
            # kube-dns, for queries that would bypass the interceptor: it knows none of the
            # benchmark names, so such a query fails the answer check instead of passing.
            lab.start_upstream("--local=/cluster.local/")
        binary = None if "coredns" in skip else coredns_binary()
        with kube_or_nothing(lab, tmp, args, binary) as (kubeconfig, coredns_note):
            if binary is None and "coredns" not in skip:
                coredns_note = "not built (no Go toolchain or no module proxy): row left out"
            coredns = None if binary is None else (binary, kubeconfig)
            everything = systems(lab, tmp, inputs, coredns, fastpath)
            chosen = [s for s in everything if s.name.lower() not in skip]
            if not any(s.peer for s in chosen) or USER not in [s.name for s in chosen]:
                raise BenchError("--skip left no peer or no interceptor to compare")
            background = background_load()
            progress(f"idle background: {cpu_note(background)}; load average {load_before}")
            max_load = Load(args.seconds, args.clients, args.threads, args.outstanding, tool=tool)
            phases = {"pinned": Phase("max QPS", max_load, client_cpus, server_cpus)}
            pinned = run_phase(lab, chosen, inputs, phases["pinned"], args.rounds)
            unpinned: dict[str, Measured] = {}
            if args.unpinned and client_cpus:
                phases["unpinned"] = Phase("max QPS, unpinned", max_load, None, None)
                unpinned = run_phase(lab, chosen, inputs, phases["unpinned"], args.rounds)
            lowest = min(m.perf.qps for m in pinned.values())
            rate = args.rate or min(DEFAULT_RATE, max(1000, int(lowest / 2000) * 1000))
            fixed_load = Load(args.seconds, 1, 1, 100, rate=rate, verbose=True, tool=tool)
            phases["fixed"] = Phase(f"{rate:,} QPS", fixed_load, client_cpus, server_cpus)
            fixed = run_phase(lab, chosen, inputs, phases["fixed"], args.rounds)
            offer = client_offer(lab, args.client, tool, inputs, client_cpus, args.seconds)
            report = Report(
                args,
                chosen,
                pinned,
                unpinned,
                fixed,
                rate,
                background,
                load_before,
                load_average(),
                coredns_note,
                fastpath,
                phases,
                offer,
            )
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "-cached" if args.workload == "cached" else ""
        plot = write_plot(report, args.out / f"latency{suffix}.png")
        text = render(report, plot)
        out = args.out / f"peers{suffix}.md"
        out.write_text(text)
        print(text)
        print(f"written: {out}" + (f", {plot}" if plot else ""))
        return 0
    finally:
        lab.down()
        # kube-dns's dnsmasq drops root before exiting and cannot remove its pid file.
        Path(f"/run/{lab.prefix}-dnsmasq.pid").unlink(missing_ok=True)
        shutil.rmtree(PIN, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def kube_or_nothing(
    lab: Lab, tmp: Path, args: argparse.Namespace, binary: Path | None
) -> Iterator[tuple[Path | None, str]]:
    """(kubeconfig or None, a note on CoreDNS's data source)."""
    if args.workload == "cached":
        yield None, f"forward . {DNS_IP} and cache (no cluster data)"
        return
    if binary is None or args.coredns_source == "file":
        yield None, "file plugin, zone generated from the same Service list"
        return
    ctx = kube_api(lab, tmp, args.names)
    try:
        kubeconfig = ctx.__enter__()
    except Exception as exc:  # no apiserver binaries, no Go, a start failure: fall back
        if args.coredns_source == "kubernetes":
            raise BenchError(f"kube-apiserver for CoreDNS: {exc}") from exc
        progress(f"kube-apiserver unavailable ({exc}); CoreDNS uses its file plugin")
        yield None, f"file plugin (the e2e kube-apiserver was unavailable: {exc})"
        return
    try:
        yield (
            kubeconfig,
            (
                "kubernetes plugin watching the e2e kube-apiserver (v1.34) that holds the same "
                f"{args.names:,} Services, reached from the node netns through a relay"
            ),
        )
    finally:
        ctx.__exit__(None, None, None)


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

"""The node-local DNS bench: the netns lab node (:mod:`devlab.netns`) with one pod, DNS
servers started in the node namespace on the node-local address, dnsperf run from the pod,
per-CPU accounting, latency percentiles and markdown tables.

Shared by :mod:`tests.bench.peers` (issue 7: cluster names against dnsmasq, unbound and
CoreDNS) and :mod:`tests.bench.ndots` (issue 5: search-path lookups and cached answers).

The topology every system is measured in (one path length for all)::

    pod netns                 node netns
    dnsperf ──veth──▶ host veth ──▶ 169.254.20.10:53 on lo ── the server under test
    (CPU 0)          (tc: the interceptor's BPF, only while the agent runs)     (CPU 1)

Peers listen on 169.254.20.10 (NodeLocal DNSCache's address) and the pod asks that address;
the interceptor's agent listens there too, but the pod asks the kube-dns ClusterIP 10.96.0.10
as pods do, and tc on the veth steers the query to the agent (or answers it in the kernel).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from devlab.netns import DNS_IP, RESOLVER_IP, Agent, Lab, sh, stop
from tests.bench.common import (
    BenchError,
    PerfResult,
    cpu_seconds,
    parse_dnsperf,
    pinning,
    require_tool,
)

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("INTERCEPTOR_CACHE", "/var/cache/dns-interceptor"))
METRICS_PORT = 19253
"""The agent's metrics port inside the node namespace (nothing else listens there)."""
ZONE = "cluster.local"


# ------------------------------------------------------------------------------ CPUs


def cpu_plan(pin: bool = True) -> tuple[set[int] | None, set[int] | None]:
    """(load generator CPUs, server CPUs): the first CPU for dnsperf, the second for the
    server under test, so neither can be made to look slower by sharing a core with the
    other.  Without two CPUs (or with ``pin`` off) nothing is pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of a running process (the agent is started by :mod:`devlab.netns`,
    which takes no ``preexec_fn``); threads it starts later inherit the mask."""
    if not cpus:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


@dataclass(frozen=True)
class CpuSample:
    """Per-CPU jiffies from /proc/stat: cpu -> (busy, softirq, total)."""

    ticks: dict[int, tuple[int, int, int]]


def cpu_sample() -> CpuSample:
    out: dict[int, tuple[int, int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m is None:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        f = [int(x) for x in m.group(2).split()[:8]]
        total = sum(f)
        out[int(m.group(1))] = (total - f[3] - f[4], f[6], total)
    return CpuSample(out)


@dataclass(frozen=True)
class CpuUse:
    busy_pct: float
    """Share of the CPU not idle: user + system + interrupts, whoever ran."""
    softirq_pct: float
    """Of which softirq: the kernel's packet processing (and an in-kernel answer)."""


def cpu_use(a: CpuSample, b: CpuSample) -> dict[int, CpuUse]:
    out = {}
    for cpu, (busy1, soft1, total1) in b.ticks.items():
        busy0, soft0, total0 = a.ticks[cpu]
        span = max(1, total1 - total0)
        out[cpu] = CpuUse(
            round(100 * (busy1 - busy0) / span, 1), round(100 * (soft1 - soft0) / span, 1)
        )
    return out


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def background_load(
    seconds: float = 2.0, settle_below: float = 15.0, timeout: float = 60.0
) -> dict[int, CpuUse]:
    """CPU use while nothing of ours should be busy, sampled until every CPU is below
    ``settle_below``% (a freshly filled kube-apiserver keeps working for a while) or
    ``timeout`` passes.  Other jobs on a shared machine show up here, and the report says so
    instead of blaming the server under test."""
    deadline = time.monotonic() + timeout
    while True:
        a = cpu_sample()
        time.sleep(seconds)
        use = cpu_use(a, cpu_sample())
        if max(u.busy_pct for u in use.values()) < settle_below or time.monotonic() > deadline:
            return use


# ------------------------------------------------------------------------------ dnsperf


@dataclass(frozen=True)
class Load:
    """One dnsperf run: the knobs that decide whether the client or the server is the limit."""

    duration: float
    clients: int
    threads: int
    outstanding: int
    rate: int | None = None
    """-Q: a fixed offered rate (None: as fast as the server answers)."""
    verbose: bool = False
    """-v: one line per query with its latency (the distribution dnsperf does not print)."""
    runs: int | None = None
    """-n: passes through the query file (a warm-up), instead of a time limit."""
    timeout: float = 2.0
    tool: str = "dnsperf"
    """The load generator: dnsperf, or dnsblast (tests/bench/blast.py), which takes the same
    options and prints the same report."""

    def args(self, target: str, queries: Path) -> list[str]:
        cmd = [self.tool, "-s", target, "-d", str(queries), "-c", str(self.clients)]
        cmd += ["-T", str(self.threads), "-q", str(self.outstanding), "-t", f"{self.timeout:g}"]
        if self.runs is not None:
            cmd += ["-n", str(self.runs)]
        else:
            cmd += ["-l", f"{self.duration:g}"]
        if self.rate is not None:
            cmd += ["-Q", str(self.rate)]
        if self.verbose:
            cmd.append("-v")
        return cmd


@dataclass
class Measured:
    """What one dnsperf run from the pod showed, with where the CPU time went."""

    system: str
    perf: PerfResult
    cpu: dict[int, CpuUse]
    client_cpus: set[int] | None
    server_cpus: set[int] | None
    server_pct: float | None
    """The server process's own CPU time over the run (None for the in-kernel answer)."""
    response_bytes: float
    latencies_us: list[float] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    """Deltas of agent metrics over the run (fast-path hits, upstream queries ...)."""
    wall: float = 0.0
    rounds: list[Measured] = field(default_factory=list)
    """Every round this row was chosen from (see :func:`best_of`)."""

    @property
    def lost_in_all_rounds(self) -> int:
        return sum(r.perf.queries_lost for r in self.rounds or [self])

    @property
    def other_pct(self) -> float:
        """CPU (percent of one CPU, summed over all) that neither dnsperf nor the server
        process used: other jobs on a shared machine.  The kernel's packet work mostly runs
        in their syscalls and is charged to them (the fast path's answers to dnsperf), so what
        is left is an estimate of the disturbance (kernel threads and interrupts count too)."""
        busy = sum(u.busy_pct for u in self.cpu.values())
        ours = (self.perf.dnsperf_cpu_pct or 0.0) + (self.server_pct or 0.0)
        return max(0.0, round(busy - ours, 1))

    @property
    def cpu_us_per_answer(self) -> float:
        """Busy CPU time of the whole machine (client, kernel and server alike) per answered
        query: the cost of an answer whichever side ran out of CPU first."""
        busy = sum(u.busy_pct for u in self.cpu.values()) / 100 * self.wall
        return 1e6 * busy / max(1, self.perf.queries_completed)

    def busy(self, cpus: set[int] | None) -> float | None:
        if not cpus:
            return None
        return max(self.cpu[c].busy_pct for c in cpus)

    @property
    def client_busy(self) -> float | None:
        return self.busy(self.client_cpus)

    @property
    def server_busy(self) -> float | None:
        return self.busy(self.server_cpus)

    @property
    def limit(self) -> str:
        """Which side ran out of CPU: ``client`` means the QPS is a lower bound of what the
        server can do (dnsperf and the kernel's work on its CPU filled that core)."""
        c, s = self.client_busy, self.server_busy
        if c is None or s is None:  # unpinned: client and server share every CPU
            busy = min(u.busy_pct for u in self.cpu.values())
            return "all CPUs" if busy >= 95 else "neither"
        if c >= 95 and s >= 95:
            return "both"
        if c >= 95:
            return "client"
        if s >= 95:
            return "server"
        return "neither"


LINE = re.compile(r"^> (\S+) (\S+) (\S+) ([0-9]+\.[0-9]+)$", re.MULTILINE)


def run_dnsperf(
    lab: Lab,
    pod: str,
    system: str,
    target: str,
    queries: Path,
    load: Load,
    client_cpus: set[int] | None,
    server_cpus: set[int] | None,
    server_pid: int | None = None,
    counters: Callable[[], dict[str, float]] | None = None,
) -> Measured:
    """dnsperf from ``pod`` against ``target``, pinned to ``client_cpus``; a run without
    statistics, or with a per-query log that disagrees with dnsperf's own average, is an
    error rather than a row in the table."""
    if load.tool == "dnsperf":
        require_tool("dnsperf")
    cmd = ["ip", "netns", "exec", lab.pod_ns(pod), *load.args(target, queries)]
    before_counters = counters() if counters else {}
    limit = (load.duration if load.runs is None else 60) + 60
    # dnsperf writes to a file, not a pipe: with -v it prints a line per query, and a pipe
    # would need this process to keep reading on some CPU while the server works.
    with tempfile.TemporaryFile("w+") as report:
        cpu0 = cpu_sample()
        srv0 = cpu_seconds(server_pid) if server_pid else 0.0
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        try:
            out = subprocess.run(
                cmd,
                stdout=report,
                stderr=subprocess.PIPE,
                text=True,
                timeout=limit,
                check=False,
                preexec_fn=pinning(client_cpus),
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"dnsperf did not finish within {limit:.0f}s") from exc
        wall = time.monotonic() - start
        cpu = cpu_use(cpu0, cpu_sample())
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_pct = round(100 * (cpu_seconds(server_pid) - srv0) / wall, 1) if server_pid else None
        report.seek(0)
        stdout = report.read()
    if out.returncode != 0:
        raise BenchError(f"dnsperf failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    # dnsperf is the only child reaped meanwhile, so the children's rusage is its CPU time.
    client = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    perf = parse_dnsperf(system, "ip netns exec <pod> " + shlex.join(cmd[4:]), stdout)
    perf = replace(perf, server_cpu_pct=server_pct, dnsperf_cpu_pct=round(100 * client / wall, 1))
    m = re.search(r"Average packet size:\s*request \d+, response (\d+)", stdout)
    lat: list[float] = []
    if load.verbose:
        lat = [1e6 * float(x[3]) for x in LINE.findall(stdout)]
        check_latencies(system, perf, lat)
    deltas = {}
    if counters:
        after = counters()
        deltas = {k: after.get(k, 0.0) - v for k, v in before_counters.items()}
    return Measured(
        system,
        perf,
        cpu,
        client_cpus,
        server_cpus,
        server_pct,
        float(m.group(1)) if m else 0.0,
        lat,
        deltas,
        wall,
    )


def check_latencies(system: str, perf: PerfResult, lat: list[float]) -> None:
    """The per-query lines must be the completed queries, and their mean dnsperf's average
    (both printed with microsecond resolution): otherwise the percentiles would describe
    something else than the run."""
    if len(lat) != perf.queries_completed:
        raise BenchError(
            f"{system}: dnsperf -v printed {len(lat)} latencies for "
            f"{perf.queries_completed} completed queries"
        )
    if lat:
        mean_ms = sum(lat) / len(lat) / 1000
        if abs(mean_ms - perf.avg_latency_ms) > 0.002:
            raise BenchError(
                f"{system}: mean of per-query latencies {mean_ms:.4f} ms differs from "
                f"dnsperf's average {perf.avg_latency_ms:.4f} ms"
            )


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (the value at least ``p``% of samples are at or below)."""
    if not sorted_values:
        return math.nan
    # Rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, and its
    # ceiling would pick the 1000th sample instead of the 999th.
    rank = max(1, math.ceil(round(p / 100 * len(sorted_values), 9)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


# ------------------------------------------------------------------------------ servers


@dataclass
class Server:
    """A DNS server under test, running in the node namespace."""

    name: str
    proc: subprocess.Popen[bytes] | subprocess.Popen[str]
    command: list[str]
    target: str
    """The address the pod asks: the node-local address, or the kube-dns IP for the agent."""
    agent: Agent | None = None
    counters: Callable[[], dict[str, float]] | None = None

    def stop(self) -> None:
        stop(self.proc)


def add_node_local_address(lab: Lab) -> None:
    """169.254.20.10 on the node's lo, for the peers.  The agent finds it there and leaves
    it alone (it removes only an address it added itself)."""
    sh("ip", "addr", "add", f"{RESOLVER_IP}/32", "dev", "lo", netns=lab.node)


def start_in_node(
    lab: Lab,
    name: str,
    cmd: list[str],
    log: Path,
    cpus: set[int] | None,
    ready: Callable[[], bool],
    timeout: float = 60,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the node namespace (``nsenter --net`` execs it, so the PID is the
    server's own), pinned to ``cpus``, and wait until ``ready()``."""
    full = ["nsenter", f"--net=/run/netns/{lab.node}", *cmd]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pinning(cpus),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail}")
        if ready():
            return proc
        time.sleep(0.2)
    stop(proc)
    raise BenchError(f"{name} did not become ready within {timeout:.0f}s (log: {log})")


def dig_from_pod(lab: Lab, pod: str, target: str, name: str, qtype: str = "A") -> list[str]:
    r = lab.run_in_pod(pod, "dig", f"@{target}", "+short", "+time=1", "+tries=1", name, qtype)
    return [ln for ln in r.stdout.splitlines() if ln and not ln.startswith(";")]


CHECK = r"""
import json, sys
import dns.message, dns.query, dns.rdatatype
target, path = sys.argv[1], sys.argv[2]
bad = []
for name, want in json.load(open(path)):
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), target, timeout=2)
        got = sorted(rd.address for rrset in r.answer for rd in rrset
                     if rrset.rdtype == dns.rdatatype.A)
    except Exception as exc:
        got = [f"error: {exc}"]
    if got != [want]:
        bad.append((name, want, got))
print(json.dumps(bad[:5] + [len(bad)]))
"""


def write_expected(path: Path, expected: Sequence[tuple[str, str]]) -> Path:
    """The (name, address) pairs every system must answer, for :func:`check_answers`."""
    path.write_text(json.dumps(list(expected)))
    return path


def check_answers(lab: Lab, pod: str, target: str, expected: Path) -> None:
    """Every benchmark name answered with exactly its address, asked from the pod with an
    independent client (dnspython): a server that answers fast but wrong, or a query that
    slipped past the interceptor to kube-dns, fails here instead of entering the table."""
    python = str(ROOT / ".venv" / "bin" / "python")
    r = lab.run_in_pod(pod, python, "-c", CHECK, target, str(expected), timeout=300)
    if r.returncode != 0:
        raise BenchError(f"answer check failed to run: {r.stderr.strip()[-500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out[-1]:
        total = len(json.loads(expected.read_text()))
        raise BenchError(f"{target}: {out[-1]} of {total} answers wrong, e.g. {out[:-1]}")


@functools.cache
def agent_flags() -> str:
    """``interceptor agent --help``: the optional features (fast path, autopath) are detected
    from it, so the benchmark runs before and after they land."""
    r = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "interceptor", "agent", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    return r.stdout


def unlimited() -> tuple[str, ...]:
    """The per-pod budgets off: a benchmark's one client pod measures capacity, which the
    budgets (there to keep one pod from starving the others) would cap."""
    flags = agent_flags()
    out: tuple[str, ...] = ()
    for flag in ("--query-rate", "--answer-rate"):
        if flag in flags:
            out += (flag, "0")
    return out


def scrape(lab: Lab) -> str:
    """The agent's Prometheus text, fetched inside the node namespace."""
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics',"
        "timeout=5).read().decode())"
    )
    r = sh(
        "nsenter", f"--net=/run/netns/{lab.node}", "python3", "-c", code, check=False, timeout=15
    )
    return r.stdout if r.returncode == 0 else ""


def metric_sums(text: str, wanted: dict[str, str]) -> dict[str, float]:
    """Sum of every sample of a metric whose labels contain a given fragment:
    ``{"fastpath hits": 'interceptor_fastpath_total{result="hit"'}``.  Absent metrics are
    left out (the feature is not there yet)."""
    out: dict[str, float] = {}
    for key, prefix in wanted.items():
        name, _, labels = prefix.partition("{")
        labels = labels.rstrip("}")
        total, seen = 0.0, False
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            metric, _, value = line.rpartition(" ")
            if not (metric == name or metric.startswith(name + "{")):
                continue
            if labels and labels not in metric:
                continue
            seen = True
            total += float(value)
        if seen:
            out[key] = total
    return out


def start_agent(
    lab: Lab,
    source: Path,
    pin: Path,
    cpus: set[int] | None,
    name: str,
    extra: Sequence[str],
    wanted: dict[str, str],
) -> Server:
    """The interceptor agent in the node namespace (BPF on the pod's veth), pinned to the
    server CPU, forwarding to the lab's kube-dns, metrics on :data:`METRICS_PORT`.  Pinned
    maps from a previous variant are removed first, so every variant starts cold."""
    shutil.rmtree(pin, ignore_errors=True)
    agent = lab.start_agent(
        source,
        "--upstream",
        f"{DNS_IP}:53",
        "--metrics-address",
        f"127.0.0.1:{METRICS_PORT}",
        *unlimited(),
        *extra,
        pin_dir=pin,
    )
    pin_process(agent.proc.pid, cpus)
    cmd = [a for a in agent.proc.args if isinstance(a, str)]  # type: ignore[union-attr]
    return Server(
        name,
        agent.proc,
        cmd,
        DNS_IP,
        agent=agent,
        counters=lambda: metric_sums(scrape(lab), wanted),
    )


def stop_agent(server: Server, pin: Path) -> None:
    """Stop the agent by PID and drop its pinned maps (the lab removes its state dir)."""
    server.stop()
    shutil.rmtree(pin, ignore_errors=True)


# ------------------------------------------------------------------------------ peers


def dnsmasq_command(tmp: Path, name: str, *extra: str) -> list[str]:
    """dnsmasq on the node-local address: no resolv.conf, no /etc/hosts, its own pid file,
    log to stderr (our log file), single-threaded as always."""
    dnsmasq = require_tool("dnsmasq", "/usr/sbin/dnsmasq")
    return [
        dnsmasq,
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        f"--listen-address={RESOLVER_IP}",
        "--bind-interfaces",
        f"--pid-file={tmp / (name + '.pid')}",
        "--log-facility=-",
        *extra,
    ]


def unbound_command(tmp: Path, name: str, body: str) -> list[str]:
    """unbound in the foreground with one thread on the node-local address; ``body`` adds
    the zone data or the forwarding.  No chroot, no user switch, no control socket, no
    DNSSEC module: it is measured as a plain local server / caching forwarder."""
    unbound = require_tool("unbound", "/usr/sbin/unbound")
    conf = tmp / f"{name}.conf"
    conf.write_text(
        "server:\n"
        f"  interface: {RESOLVER_IP}\n"
        "  port: 53\n"
        "  num-threads: 1\n"
        "  do-daemonize: no\n"
        '  chroot: ""\n'
        '  username: ""\n'
        '  pidfile: ""\n'
        '  directory: "/"\n'
        "  use-syslog: no\n"
        "  verbosity: 0\n"
        "  access-control: 0.0.0.0/0 allow\n"
        "  do-ip6: no\n"
        '  module-config: "iterator"\n'
        "  so-reuseport: no\n"
        "  msg-cache-size: 64m\n"
        "  rrset-cache-size: 128m\n" + body + "remote-control:\n  control-enable: no\n"
    )
    return [unbound, "-d", "-c", str(conf)]


def coredns_binary() -> Path | None:
    """The pinned CoreDNS from ``scripts/build-peers.sh coredns`` (built once per machine from
    the Go module proxy, then cached); None when it cannot be had (no Go toolchain, no proxy):
    the row is then left out and the report says why."""
    if shutil.which("go") is None:
        return None
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-peers.sh"), "coredns"],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    paths = [Path(p) for p in r.stdout.split() if Path(p).name.startswith("coredns-")]
    return paths[0] if r.returncode == 0 and paths else None


def coredns_command(binary: Path, tmp: Path, name: str, body: str) -> list[str]:
    """CoreDNS with one server block on the node-local address; ``body`` is its plugins."""
    corefile = tmp / f"{name}.Corefile"
    corefile.write_text(f".:53 {{\n    bind {RESOLVER_IP}\n    errors\n{body}}}\n")
    return [str(binary), "-conf", str(corefile), "-quiet"]


def forwarder_commands(tmp: Path, coredns: Path | None) -> list[tuple[str, str, list[str]]]:
    """(name, description, command) of dnsmasq, unbound and CoreDNS (when built) as caching
    forwarders to kube-dns's address, as NodeLocal DNSCache forwards the names it does not
    own: the peers of every cached-name benchmark."""
    out = [
        (
            "dnsmasq",
            f"--server={DNS_IP} --cache-size=10000",
            dnsmasq_command(tmp, "dnsmasq", f"--server={DNS_IP}", "--cache-size=10000"),
        ),
        (
            "unbound",
            f'forward-zone "." to {DNS_IP}, 1 thread, local-zone "test." nodefault',
            unbound_command(
                tmp,
                "unbound",
                # unbound answers the RFC 6761 "test." zone itself unless told not to.
                '  local-zone: "test." nodefault\n'
                "  do-not-query-localhost: no\n"
                "forward-zone:\n"
                '  name: "."\n'
                f"  forward-addr: {DNS_IP}\n",
            ),
        ),
    ]
    if coredns is not None:
        body = f"    forward . {DNS_IP}\n    cache\n"
        out.append(
            (
                "CoreDNS",
                f"{coredns.name}: forward . {DNS_IP}, cache",
                coredns_command(coredns, tmp, "coredns", body),
            )
        )
    return out


# ------------------------------------------------------------------------------ output


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, first column left-aligned, numbers right-aligned."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_note(use: dict[int, CpuUse]) -> str:
    return ", ".join(f"CPU {c} {u.busy_pct:.0f}% busy" for c, u in sorted(use.items()))


def fmt_us(v: float) -> str:
    return "-" if math.isnan(v) else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def ratio_text(value: float | None, best: float | None) -> str:
    if value is None or not best or math.isnan(value) or math.isnan(best):
        return "-"
    return f"{value / best:.2f}x"


def best_of(runs: Sequence[Measured], fixed_rate: bool) -> Measured:
    """Several rounds of one system as one row.  On a machine shared with other jobs a round
    can only be slowed down, never sped up, so the least disturbed round is the best estimate:
    the highest QPS for a max-QPS phase, the round with the least :attr:`Measured.other_pct`
    for a fixed-rate phase (its percentiles then come from one clean run, not from a pool
    that mixes in a disturbed one).  Every round stays in ``rounds`` for the losses."""
    if fixed_rate:
        pick = min(runs, key=lambda r: r.other_pct)
    else:
        pick = max(runs, key=lambda r: r.perf.qps)
    return replace(pick, latencies_us=sorted(pick.latencies_us), rounds=list(runs))

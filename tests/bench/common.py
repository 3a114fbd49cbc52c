"""Helpers shared by the benchmarks: free loopback ports, readiness probes, process teardown,
dnsperf invocation and parsing, and plain-text tables.

They live apart from the benchmark itself so that a second benchmark (another server, another
transport) does not copy the fiddly parts: parsing dnsperf's report and making sure no server
outlives the run.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
"""The only address the benchmarks ever send to: a benchmark must not load anything real."""

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
"""Kubernetes' default service range; big enough for the 100k-service memory run."""


class BenchError(RuntimeError):
    """A benchmark could not run (a tool is missing, a server did not come up)."""


def require_tool(name: str, path: str | None = None) -> str:
    """The absolute path of a tool, or a clear error: a missing tool should fail up front,
    not half-way through the run with an opaque ``FileNotFoundError``."""
    found = path if path is not None and Path(path).exists() else shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed (needed by the benchmark)")
    return found


def service_ip(index: int) -> str:
    """The ClusterIP of service ``index``: consecutive addresses from :data:`SERVICE_CIDR`,
    skipping the network address, so both servers get identical, valid data."""
    if not 0 <= index < SERVICE_CIDR.num_addresses - 2:
        raise ValueError(f"service index {index} does not fit in {SERVICE_CIDR}")
    return str(SERVICE_CIDR.network_address + 1 + index)


def service_manifest(index: int, namespace: str = "bench") -> dict[str, Any]:
    """One ClusterIP Service with one named port, as the Kubernetes API would return it (the
    named port makes the map build SRV answers too, as for a typical real Service)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{index}", "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": service_ip(index),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }


def free_port(exclude: Collection[int] = ()) -> int:
    """A loopback port free for both UDP and TCP right now, and not in ``exclude``.

    The DNS servers listen on both, and the kernel hands out ephemeral ports per protocol, so
    a port is only taken once a TCP bind on the same number succeeds too.  ``exclude`` holds
    ports already promised to someone but not bound yet (the interceptor's dead upstream), so
    the next server is not handed the same number.  (There is a small race between closing
    these sockets and the server binding; retrying is the caller's job.)
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = int(udp.getsockname()[1])
            if port in exclude:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise BenchError("no loopback port is free for both UDP and TCP")


def dig_answer(port: int, name: str, timeout: float = 1.0) -> str:
    """The A answer of ``name`` from the server on ``port`` (``""`` if none or no reply).

    dig is used rather than a Python resolver so the readiness probe shares no code with the
    server under test."""
    cmd = [
        "dig",
        f"@{LOOPBACK}",
        "-p",
        str(port),
        name,
        "A",
        "+short",
        f"+time={max(1, round(timeout))}",
        "+tries=1",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 2, check=False)
    except subprocess.TimeoutExpired:
        return ""
    lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith(";")]
    return lines[0] if lines else ""


def wait_until_answers(
    proc: subprocess.Popen[bytes],
    port: int,
    name: str,
    expected: str,
    what: str,
    log: Path | None = None,
    timeout: float = 30.0,
) -> float:
    """Block until the server answers ``name`` with ``expected``; return the seconds it took.

    Polling with real queries (not just "the port is bound") proves the data is loaded, so
    dnsperf never measures a server that is still reading its input.  A server that exits
    early fails fast with its log, instead of after the whole timeout.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise BenchError(f"{what} exited with status {proc.returncode}:\n{tail}")
        if dig_answer(port, name, timeout=1.0) == expected:
            return time.monotonic() - start
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer {name} with {expected} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL if it lingers.

    Only our own Popen handle is signalled (never a name match), so a benchmark cannot take
    down an unrelated dnsmasq running on the machine."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc.

    Sampled around a dnsperf run it says whether the server was saturated (about 100% of a
    core for a single-threaded server) or the client was the bottleneck."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the ")" closing comm, field 3 (state) is index 0, so utime (14) and stime (15)
    # are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinning(cpus: set[int] | None) -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` that pins the child to ``cpus`` before it execs (None: no
    pinning).  Done before exec so every thread the program creates inherits it; safe because
    the benchmark process itself runs no threads."""
    if not cpus:
        return None
    frozen = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, frozen)

    return pin


@dataclass(frozen=True)
class PerfParams:
    """The dnsperf knobs that decide whether the client or the server is the bottleneck."""

    duration: int
    clients: int
    threads: int
    outstanding: int
    timeout: float = 2.0


@dataclass(frozen=True)
class PerfResult:
    """What one dnsperf run reports, plus the command line so it can be reproduced."""

    server: str
    command: str
    queries_sent: int
    queries_completed: int
    queries_lost: int
    qps: float
    avg_latency_ms: float
    min_latency_ms: float
    max_latency_ms: float
    latency_stddev_ms: float
    noerror: int
    other_rcodes: str
    server_cpu_pct: float | None = None
    """Server CPU time over the run's wall time: ~100 means one core saturated."""
    dnsperf_cpu_pct: float | None = None
    """dnsperf's CPU time over the same wall time: ~100 (pinned) means the client was the
    limit, so ``qps`` is a lower bound of what the server can do."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dnsperf_command(dnsperf: str, port: int, queries: Path, p: PerfParams) -> list[str]:
    """The dnsperf argument list; always aimed at loopback."""
    return [
        dnsperf,
        "-s",
        LOOPBACK,
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        str(p.duration),
        "-c",
        str(p.clients),
        "-T",
        str(p.threads),
        "-q",
        str(p.outstanding),
        "-t",
        f"{p.timeout:g}",
    ]


def run_dnsperf(
    server: str,
    cmd: Sequence[str],
    duration: int,
    server_pid: int | None = None,
    cpus: set[int] | None = None,
) -> PerfResult:
    """Run dnsperf once (pinned to ``cpus`` if given) and parse its report, adding the CPU
    share the server and dnsperf used meanwhile.  A run that yields no statistics is an
    error: printing 0 QPS for a server that was never reached would be a lie in the table.

    dnsperf's CPU comes from RUSAGE_CHILDREN, which only counts reaped children: dnsperf is
    the only child that ends during the run (the servers are reaped at teardown).
    """
    server_cpu0 = cpu_seconds(server_pid) if server_pid is not None else 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    try:
        out = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
            preexec_fn=pinning(cpus),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"dnsperf did not finish within {duration + 60}s") from exc
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise BenchError(f"dnsperf failed ({out.returncode}): {out.stderr.strip()}")
    result = parse_dnsperf(server, shlex.join(cmd), out.stdout)
    client = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    server_pct = None
    if server_pid is not None:
        server_pct = round(100 * (cpu_seconds(server_pid) - server_cpu0) / wall, 1)
    return replace(result, server_cpu_pct=server_pct, dnsperf_cpu_pct=round(100 * client / wall, 1))


_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def _ms(seconds: str) -> float:
    """dnsperf reports seconds with microsecond resolution; keep exactly that in ms."""
    return round(1000 * float(seconds), 3)


def _grab(pattern: str, text: str, what: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        raise BenchError(f"dnsperf output has no {what}:\n{text}")
    return m.group(1)


def parse_dnsperf(server: str, command: str, text: str) -> PerfResult:
    """Parse dnsperf's "Statistics:" block (the format of dnsperf 2.x)."""
    rcodes = _grab(r"^\s*Response codes:\s*(.*)$", text, "response codes")
    counts = dict(re.findall(r"([A-Z]+) (\d+)", rcodes))
    return PerfResult(
        server=server,
        command=command,
        queries_sent=int(_grab(r"Queries sent:\s*(\d+)", text, "queries sent")),
        queries_completed=int(_grab(r"Queries completed:\s*(\d+)", text, "queries completed")),
        queries_lost=int(_grab(r"Queries lost:\s*(\d+)", text, "queries lost")),
        qps=round(float(_grab(rf"Queries per second:\s*{_NUM}", text, "queries per second")), 1),
        avg_latency_ms=_ms(_grab(rf"Average Latency \(s\):\s*{_NUM}", text, "average latency")),
        min_latency_ms=_ms(_grab(rf"\(min {_NUM}", text, "min latency")),
        max_latency_ms=_ms(_grab(rf"max {_NUM}\)", text, "max latency")),
        latency_stddev_ms=_ms(_grab(rf"Latency StdDev \(s\):\s*{_NUM}", text, "latency stddev")),
        noerror=int(counts.pop("NOERROR", 0)),
        other_rcodes=", ".join(f"{k} {v}" for k, v in counts.items()) or "-",
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned (names), the rest right-aligned
    (numbers), so it reads well in a terminal and in CI logs alike."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def positive(text: str) -> int:
    """argparse type: a positive integer."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value

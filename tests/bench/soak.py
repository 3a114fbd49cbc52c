"""Soak: ``python -m tests.bench.soak [--minutes 10] [--restart-every 120]`` (root; lab node).

The agent on the lab node under a mixed load for ``--minutes``, at ``--load`` (0.8) of the
maximum it served for the same mix a moment before:

- **dnsperf** (open-loop, one pod): names answered in the kernel, SRV answered in userspace,
  cached external names, and search-path junk (autopath);
- **stub** (one pod): a lookup every 20 ms, as a stub resolver makes it (1 s timeout, three
  tries, a fresh ID and port each try), its latency and whether it failed;
- **TCP** (one pod): five pipelined queries on a new connection every 50 ms, retried like
  the stub's.

Beside the load: the service map changes ``--churn`` times a minute (a Service added and one
removed, in the YAML source the agent follows), and the agent restarts every
``--restart-every`` seconds, by SIGKILL and by SIGTERM in turn (pods fail open to kube-dns,
the lab's dnsmasq, while it is away).

Pass: no stub or TCP lookup failed; within each agent's life, RSS grew less than 5% from 30 s
after its start to its end, and its open file descriptors did not grow.  dnsperf's own losses
(it never retries) are reported beside: a SIGKILL loses what sat in the dead resolver's socket.
Writes ``soak.csv`` (every sample) and ``soak.svg`` (RSS and the stub's p99 over time, the
restarts marked) to ``--out``.  Budgets are off (``--query-rate 0``): the load is one pod's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from devlab.netns import DNS_IP, Agent, Lab, PodSpec, stop
from tests.bench.common import parse_dnsperf, require_tool, table
from tests.fuzzing import rss_kib

PODS = [
    PodSpec("load", "10.244.1.10", "ns1"),
    PodSpec("stub", "10.244.1.11", "ns1"),
    PodSpec("tcp", "10.244.1.12", "ns1"),
]
EXTERNAL = [f"ext{i}.soak.test" for i in range(50)]
SVC = "svc1.ns1.svc.cluster.local"
SRV = "_http._tcp.svc1.ns1.svc.cluster.local"
ASKED = [(SVC, 1), (SRV, 33), ("ext7.soak.test", 1), ("ext7.soak.test.ns1.svc.cluster.local", 1)]
"""What the stub and TCP clients ask, in turn: kernel, userspace, cached, junk."""

STUB = r"""
import json, random, socket, struct, sys, time
asked = json.loads(sys.argv[1]); server = sys.argv[2]; tcp = sys.argv[3] == "tcp"
end = time.monotonic() + float(sys.argv[4])
def wire(name, qtype, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack("!HH", qtype, 1)
def udp_once(name, qtype):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        q = wire(name, qtype, random.randrange(65536))
        s.sendto(q, (server, 53))
        while True:
            r = s.recv(4096)
            if r[:2] == q[:2]:
                return r[3] & 15
def tcp_once(name, qtype):
    qs = [wire(name, qtype, random.randrange(65536)) for _ in range(5)]
    with socket.create_connection((server, 53), timeout=1.0) as c:
        c.sendall(b"".join(struct.pack("!H", len(q)) + q for q in qs))
        buf, got = b"", 0
        while got < 5:
            more = c.recv(65535)
            if not more:
                raise OSError("closed early")
            buf += more
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]; rc = buf[5] & 15; buf = buf[2 + n:]
                got += 1
        return rc
once = tcp_once if tcp else udp_once
period = 0.05 if tcp else 0.02
i = 0
window, t_win = [], time.monotonic()
while time.monotonic() < end:
    name, qtype = asked[i % len(asked)]; i += 1
    t0 = time.monotonic(); ok = False; rcode = None; errors = []
    for attempt in range(3):
        try:
            rcode = once(name, qtype)
            ok = rcode in (0, 3)
            if ok:
                break
            errors.append(f"rcode {rcode}")
        except OSError as exc:
            errors.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
            time.sleep(0.2 if tcp else 0)
    lat = time.monotonic() - t0
    window.append((lat, ok, errors, attempt, name))
    now = time.monotonic()
    if now - t_win >= 5:
        lats = sorted(w[0] for w in window)
        print(json.dumps({"t": time.time(), "n": len(window),
            "p99": lats[int(len(lats) * 0.99) - 1] if lats else 0,
            "failed": [[w[4], w[2]] for w in window if not w[1]],
            "retried": sum(1 for w in window if w[3] > 0),
            "retry_errors": [w[2] for w in window if w[3] > 0][:5]}), flush=True)
        window, t_win = [], now
    pause = t0 + period - time.monotonic()
    if pause > 0:
        time.sleep(pause)
"""


def source_yaml(churn: int) -> str:
    items = [
        "- {apiVersion: v1, kind: Namespace, metadata: {name: ns1}}",
        "- apiVersion: v1\n  kind: Service\n  metadata: {name: svc1, namespace: ns1}\n"
        "  spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}",
    ]
    for pod in PODS:
        items.append(
            f"- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {pod.name}, namespace: ns1}}\n"
            f"  spec: {{nodeName: node-1}}\n  status: {{podIPs: [{{ip: {pod.ip}}}]}}"
        )
    for k in (churn, churn + 1):  # one new, one gone, every step
        i = k % 200
        items.append(
            f"- apiVersion: v1\n  kind: Service\n  metadata: {{name: churn-{i}, namespace: ns1}}\n"
            f"  spec: {{clusterIP: 10.96.2.{i + 1}, ports: [{{name: http, port: 80}}]}}"
        )
    return "apiVersion: v1\nkind: List\nitems:\n" + "\n".join(items) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def proc_rss_fds(pid: int) -> tuple[int, int]:
    try:
        return rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0, 0


@dataclass
class Life:
    number: int
    started: float
    pid: int
    ended_by: str = "end of run"
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(time, RSS KiB, open fds)."""

    def warm(self) -> tuple[float, int, int] | None:
        return next((s for s in self.samples if s[0] - self.started >= 30), None)


def dnsperf_max(lab: Lab, names: Path, seconds: float = 5) -> float:
    dnsperf = require_tool("dnsperf")
    r = subprocess.run(
        ["ip", "netns", "exec", lab.pod_ns("load"), dnsperf, "-s", DNS_IP, "-d", str(names),
         "-c", "8", "-q", "200", "-l", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    return parse_dnsperf("interceptor", "dnsperf (closed loop)", r.stdout).qps


def svg(path: Path, t0: float, rss: list[tuple[float, float]], p99: list[tuple[float, float]],
        restarts: list[float]) -> None:  # fmt: skip
    """Two panels, RSS (MiB) and the stub's p99 (ms) over minutes, restarts as dashed lines."""
    width, height, pad = 900, 220, 50
    end = max([t for t, _ in rss + p99] + [t0 + 1])

    def panel(
        y0: int, series: list[tuple[float, float]], label: str, colour: str, floor: float = 0
    ) -> str:
        """``floor``: the share of the smallest value the axis starts at (RSS: growth shows)."""
        values = [v for _, v in series] or [1.0]
        low = min(values) * floor
        top = max(values) * 1.1

        def xy(t: float, v: float) -> str:
            x = pad + (t - t0) / (end - t0) * (width - 2 * pad)
            y = y0 + height - pad - (v - low) / max(top - low, 1e-9) * (height - 2 * pad)
            return f"{x:.1f},{y:.1f}"

        pts = " ".join(xy(t, v) for t, v in series)
        marks = "".join(
            f'<line x1="{xy(r, 0).split(",")[0]}" y1="{y0 + pad}" x2="{xy(r, 0).split(",")[0]}" '
            f'y2="{y0 + height - pad}" stroke="#999" stroke-dasharray="4"/>'
            for r in restarts
        )
        return (
            f'<text x="{pad}" y="{y0 + 30}" font-size="14">{label} ({low:.1f} to '
            f"{top / 1.1:.2f})</text>"
            f'<rect x="{pad}" y="{y0 + pad}" width="{width - 2 * pad}" '
            f'height="{height - 2 * pad}" fill="none" stroke="#ccc"/>{marks}'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>'
            f'<text x="{width - pad}" y="{y0 + height - pad + 20}" font-size="12" '
            f'text-anchor="end">{(end - t0) / 60:.1f} min</text>'
        )

    body = panel(0, rss, "agent RSS, MiB", "#1f77b4", floor=0.9) + panel(
        height, p99, "stub lookup p99 per 5 s, ms", "#d62728"
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{2 * height}" '
        f'font-family="sans-serif">{body}</svg>\n'
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--load", type=float, default=0.8, help="share of the measured maximum")
    p.add_argument("--restart-every", type=float, default=120, help="seconds")
    p.add_argument("--churn", type=int, default=120, help="service changes a minute")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    seconds = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    pin = Path("/sys/fs/bpf/soak-bench")
    shutil.rmtree(pin, ignore_errors=True)
    lab = Lab("soak", PODS).up()
    lives: list[Life] = []
    restarts: list[float] = []
    stop_all = threading.Event()
    try:
        lab.start_upstream(
            "--local-ttl=300",
            "--local=/cluster.local/",
            "--host-record=svc1.ns1.svc.cluster.local,10.96.1.1",
            "--srv-host=_http._tcp.svc1.ns1.svc.cluster.local,svc1.ns1.svc.cluster.local,80",
            *(f"--host-record={n},192.0.2.{i + 1}" for i, n in enumerate(EXTERNAL)),
        )
        source = tmp / "cluster.yaml"
        write_atomically(source, source_yaml(0))
        flags = ("--early-capture=0", "--query-rate=0", "--answer-rate=0")

        def start() -> Agent:
            agent = lab.start_agent(source, *flags, pin_dir=pin)
            lives.append(Life(len(lives) + 1, time.time(), agent.proc.pid))
            return agent

        agent = start()
        names = tmp / "mix.txt"
        mix = []
        for i in range(1000):
            mix += [f"{SVC} A"] * 4 + [f"{SRV} SRV"] * 2
            mix += [f"{EXTERNAL[i % 50]} A"] * 3 + [f"{EXTERNAL[i % 50]}.ns1.svc.cluster.local A"]
        names.write_text("\n".join(mix) + "\n")
        for n in EXTERNAL:  # cached before measuring
            lab.run_in_pod("load", "dig", "+short", "+time=1", f"@{DNS_IP}", n)
        peak = dnsperf_max(lab, names)
        rate = int(peak * args.load)
        print(f"maximum for the mix: {peak:.0f} q/s; soaking at {rate} q/s for "
              f"{args.minutes:g} min", flush=True)  # fmt: skip

        dnsperf = require_tool("dnsperf")
        t0 = time.time()
        load = subprocess.Popen(
            ["ip", "netns", "exec", lab.pod_ns("load"), dnsperf, "-s", DNS_IP, "-d", str(names),
             "-Q", str(rate), "-c", "8", "-q", str(max(1000, rate)), "-l", str(seconds),
             "-t", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        clients = {
            proto: subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.pod_ns(proto),
                    sys.executable,
                    "-c",
                    STUB,
                    json.dumps(ASKED),
                    DNS_IP,
                    "tcp" if proto == "tcp" else "udp",
                    str(seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for proto in ("stub", "tcp")
        }
        windows: dict[str, list[dict[str, object]]] = {"stub": [], "tcp": []}

        def read(proto: str) -> None:
            out = clients[proto].stdout
            assert out is not None
            for line in out:
                windows[proto].append(json.loads(line))

        readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in clients]
        for t in readers:
            t.start()

        def churn() -> None:
            step, period = 0, 60 / (args.churn / 2)  # two changes a step
            while not stop_all.wait(period):
                step += 1
                write_atomically(source, source_yaml(step))

        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        next_restart = t0 + args.restart_every
        kill = True
        while time.time() < t0 + seconds:
            time.sleep(5)
            now = time.time()
            life = lives[-1]
            rss, fds = proc_rss_fds(life.pid)
            if rss:
                life.samples.append((now, rss, fds))
            if now >= next_restart and now < t0 + seconds - 20:
                life.ended_by = "SIGKILL" if kill else "SIGTERM"
                restarts.append(now)
                print(f"restart at {now:.3f} ({life.ended_by})", file=sys.stderr, flush=True)
                if kill:
                    agent.proc.send_signal(signal.SIGKILL)
                    agent.proc.wait(timeout=10)
                else:
                    stop(agent.proc, timeout=15)
                kill = not kill
                agent = start()
                next_restart = now + args.restart_every
        stop_all.set()
        report, _ = load.communicate(timeout=60)
        for c in clients.values():
            c.wait(timeout=60)
        for t in readers:
            t.join(timeout=5)
        stop(agent.proc)
    finally:
        stop_all.set()
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    rows, ok = [], True
    for life in lives:
        warm = life.warm()
        if warm is None or not life.samples:
            rows.append((str(life.number), life.ended_by, "-", "-", "-", "-", "-"))
            continue
        end = life.samples[-1]
        growth = (end[1] - warm[1]) / warm[1] * 100
        ok &= growth < 5 and end[2] <= warm[2]
        rows.append((str(life.number), life.ended_by, f"{warm[1] / 1024:.1f}",
                     f"{end[1] / 1024:.1f}", f"{growth:+.1f}%", str(warm[2]),
                     str(end[2])))  # fmt: skip
    print(table(["agent life", "ended by", "RSS MiB at 30 s", "RSS MiB at end", "growth",
                 "fds at 30 s", "fds at end"], rows))  # fmt: skip

    def total(proto: str, key: str) -> int:
        return sum(len(w[key]) if isinstance(w[key], list) else int(w[key])  # type: ignore[arg-type]
                   for w in windows[proto])  # fmt: skip

    lookups = {k: sum(int(w["n"]) for w in windows[k]) for k in windows}  # type: ignore[call-overload]
    failed = {k: total(k, "failed") for k in windows}
    retried = {k: total(k, "retried") for k in windows}
    ok &= not any(failed.values()) and all(lookups.values())
    perf = parse_dnsperf("interceptor", "dnsperf (open loop)", report)
    print(f"dnsperf: {perf.queries_sent} sent at {perf.qps:.0f} q/s, {perf.queries_lost} lost, "
          f"NOERROR {perf.noerror}, others {perf.other_rcodes}, average latency "
          f"{perf.avg_latency_ms} ms (max {perf.max_latency_ms})")  # fmt: skip
    p99s = [float(w["p99"]) * 1e3 for w in windows["stub"]]  # type: ignore[arg-type]
    print(table(["client", "lookups", "failed", "needed a retry", "p99 ms (worst 5 s)"], [
        ("stub (UDP)", str(lookups["stub"]), str(failed["stub"]), str(retried["stub"]),
         f"{max(p99s):.2f}" if p99s else "-"),
        ("TCP (5 pipelined)", str(lookups["tcp"]), str(failed["tcp"]), str(retried["tcp"]), ""),
        ("dnsperf (no retries)", str(perf.queries_sent), f"{perf.queries_lost} lost", "", ""),
    ]))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "soak.csv").open("w") as f:
        f.write("time,life,rss_kib,fds\n")
        for life in lives:
            for t, rss, fds in life.samples:
                f.write(f"{t - t0:.1f},{life.number},{rss},{fds}\n")
    svg(args.out / "soak.svg", t0,
        [(t, rss / 1024) for life in lives for t, rss, _ in life.samples],
        [(float(w["t"]), float(w["p99"]) * 1e3) for w in windows["stub"]],  # type: ignore[arg-type]
        restarts)  # fmt: skip
    for k in windows:
        for w in windows[k]:
            if w["failed"] or w.get("retry_errors"):
                why = f"failed {w['failed']} retried {w.get('retry_errors')}"
                print(f"{k}: {why}", file=sys.stderr)
    print(f"{'PASS' if ok else 'FAIL'}: {args.out / 'soak.csv'}, {args.out / 'soak.svg'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

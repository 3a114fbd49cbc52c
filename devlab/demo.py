"""``make demo`` (``python -m devlab.demo``): a guided tour for newcomers.

It starts a real upstream DNS server (dnsmasq, on loopback only) standing in for the world
outside the cluster, starts ``interceptor serve`` on the bundled example cluster, and asks it
questions with ``dig``, explaining each answer.  Everything it starts, it stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devlab.netns import stop

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"

TOUR: list[tuple[str, str, str]] = [
    (
        "frontend.shop.svc.cluster.local",
        "A",
        "A ClusterIP service: answered from the service map, never leaves the node.",
    ),
    (
        "CART.shop.svc.cluster.local",
        "AAAA",
        "A dual-stack service asked in upper case: matching ignores case, the answer echoes it.",
    ),
    (
        "db.shop.svc.cluster.local",
        "A",
        "A headless service: one record per *ready* endpoint (db-2 is not ready).",
    ),
    (
        "_postgres._tcp.db.shop.svc.cluster.local",
        "SRV",
        "SRV for a named port: one target per endpoint, addresses in the additional section.",
    ),
    (
        "web.shop.svc.cluster.local",
        "A",
        "An ExternalName service: the CNAME first, then the target's records.",
    ),
    (
        "api.payments.example.com",
        "A",
        "A mesh host (Istio ServiceEntry, resolution DNS): a stable virtual IP from 240.240/16.",
    ),
    (
        "example.com.shop.svc.cluster.local",
        "A",
        "ndots:5 search-path junk: NXDOMAIN at once, never sent upstream.",
    ),
    (
        "www.example.org",
        "A",
        "Not a cluster name: forwarded to the upstream server (a local dnsmasq here).",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_answering(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            [
                "dig",
                "@127.0.0.1",
                "-p",
                str(port),
                "+time=1",
                "+tries=1",
                "+short",
                "dns-version.cluster.local",
                "TXT",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0 and r.stdout.strip():
            return True
        time.sleep(0.2)
    return False


def _summarise(dig_output: str) -> tuple[str, list[str]]:
    """The status and the resource records of one dig reply."""
    rcode = "no reply"
    records = []
    for ln in dig_output.splitlines():
        if "status: " in ln:
            rcode = ln.split("status: ")[1].split(",")[0]
        elif ln.strip() and not ln.startswith(";"):
            records.append(ln)
    return rcode, records


def run_demo() -> int:
    """The node demo as root (network namespaces, BPF); the resolver-only tour otherwise."""
    if os.geteuid() == 0:
        from devlab.demo_node import run_node_demo

        return run_node_demo()
    print("Not root: showing the resolver alone (the node demo needs network namespaces).\n")
    return run_serve_tour()


def run_serve_tour() -> int:
    for tool in ("dig", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"the demo needs {tool}: run `make setup` first", file=sys.stderr)
            return 2
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    up_port, port = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="interceptor-demo-") as tmp:
        try:
            print(
                f"{BOLD}1. An upstream DNS server{RESET} (dnsmasq on 127.0.0.1:{up_port}) "
                "stands in for the internet: it knows www.example.org."
            )
            procs.append(
                subprocess.Popen(
                    [
                        dnsmasq,
                        "--keep-in-foreground",
                        "--no-resolv",
                        "--no-hosts",
                        f"--port={up_port}",
                        "--listen-address=127.0.0.1",
                        "--bind-interfaces",
                        f"--pid-file={tmp}/dnsmasq.pid",
                        "--host-record=www.example.org,192.0.2.1",
                    ],
                    stderr=subprocess.DEVNULL,
                )
            )
            print(
                f"{BOLD}2. interceptor serve{RESET} on 127.0.0.1:{port}, with the bundled "
                "example cluster (interceptor/example/cluster.yaml).\n"
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "interceptor",
                        "--log-level",
                        "warning",
                        "serve",
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--upstream",
                        f"127.0.0.1:{up_port}",
                    ],
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
            if not _wait_answering(port):
                print("interceptor serve did not start answering", file=sys.stderr)
                return 1
            for name, qtype, why in TOUR:
                print(f"{BOLD}$ dig {name} {qtype}{RESET}\n{DIM}# {why}{RESET}")
                r = subprocess.run(
                    ["dig", "@127.0.0.1", "-p", str(port), "+time=2", name, qtype],
                    capture_output=True,
                    text=True,
                )
                rcode, records = _summarise(r.stdout)
                print(f"  status {rcode}")
                for ln in records:
                    print("  " + ln)
                print()
            print(
                f"{BOLD}Next:{RESET} `interceptor serve --source your-cluster.yaml` answers for "
                "your own objects; see the README for the node agent."
            )
            return 0
        finally:
            for proc in reversed(procs):
                stop(proc)


if __name__ == "__main__":
    sys.exit(run_demo())

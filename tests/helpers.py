"""Shared test plumbing: real processes (interceptor serve, dnsmasq) on loopback, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from devlab.netns import stop

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def need(binary: str) -> str:
    """The path of an external program a test needs; the test skips, naming it, if it is
    not installed (scripts/setup.sh installs them all, and `make test` fails on a skip)."""
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/sbin/{binary}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        import pytest

        pytest.skip(f"{binary} is not installed (scripts/setup.sh installs it)")
    return path


def free_tcp_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports: all bound at once, so the kernel cannot hand out the
    same one twice (as it may for sockets opened and closed one after another)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running ``interceptor serve`` and what it logged."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    log: list[str] = field(default_factory=list)

    def ask(
        self, name: str, rtype: str = "A", tcp: bool = False, **kw: object
    ) -> dns.message.Message:
        return ask(self.host, self.port, name, rtype, tcp, **kw)

    def log_text(self) -> str:
        return "\n".join(self.log)


def ask(
    host: str,
    port: int,
    name: str,
    rtype: str = "A",
    tcp: bool = False,
    timeout: float = 3.0,
    **kw: object,
) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=timeout)
    return dns.query.udp(q, host, port=port, timeout=timeout, ignore_trailing=False)


def start_serve(
    *extra: str, source: Path | None = DATA / "cluster.yaml", timeout: float = 15.0
) -> Served:
    cmd = [sys.executable, "-m", "interceptor", "serve", "--listen", "127.0.0.1:0", *extra]
    if source is not None:
        cmd += ["--source", str(source)]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        m = re.search(r"serving DNS on (\S+) port (\d+)", line)
        if m:
            port = int(m.group(2))
            break
    if port is None:
        stop(proc)
        raise AssertionError("interceptor serve did not start:\n" + "\n".join(lines))
    served = Served(proc, "127.0.0.1", port, lines)

    def drain() -> None:
        assert proc.stderr is not None
        for ln in proc.stderr:
            lines.append(ln.rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    return served


@dataclass
class Dnsmasq:
    """A real DNS server on loopback, with a query log to count what reached it."""

    proc: subprocess.Popen[bytes]
    port: int
    logfile: Path

    def queries(self, name: str | None = None) -> list[str]:
        """Queries received (``query[A] name from ...`` lines), optionally for one name."""
        try:
            text = self.logfile.read_text()
        except FileNotFoundError:
            return []
        out = [ln for ln in text.splitlines() if "query[" in ln]
        if name is not None:
            out = [ln for ln in out if f" {name.lower()} from" in ln.lower()]
        return out


def start_dnsmasq(tmp: Path, *records: str) -> Dnsmasq:
    port = free_port()
    logfile = tmp / "dnsmasq.log"
    proc = subprocess.Popen(
        [
            need("dnsmasq"),
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--pid-file={tmp}/dnsmasq.pid",
            "--log-queries",
            f"--log-facility={logfile}",
            "--cache-size=0",
            *records,
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ask("127.0.0.1", port, "probe.invalid", timeout=0.5)
            break
        except Exception:
            time.sleep(0.1)
    return Dnsmasq(proc, port, logfile)


class FakeUpstream:
    """An in-process nameserver for fault injection: answers every A question with
    192.0.2.99 (TTL ``ttl``) after ``delay`` seconds, counts what it receives, and can be
    switched off (``answering = False``) to act as a blackhole."""

    def __init__(self, delay: float = 0.0, ttl: int = 60) -> None:
        self.delay = delay
        self.ttl = ttl
        self.answering = True
        self.spoof = False
        """First send forged replies (wrong ID; right ID but another question)."""
        self.received: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import dns.rrset

        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            q = dns.message.from_wire(data)
            self.received.append(q.question[0].name.to_text())
            if not self.answering:
                continue
            r = dns.message.make_response(q)
            r.answer.append(
                dns.rrset.from_text(q.question[0].name, self.ttl, "IN", "A", "192.0.2.99")
            )
            wire = r.to_wire()
            if self.spoof:
                forged = dns.message.make_response(q)
                forged.id = (q.id + 1) & 0xFFFF
                forged.answer.append(
                    dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "203.0.113.66")
                )
                self.sock.sendto(forged.to_wire(), addr)
                other = dns.message.make_response(dns.message.make_query("evil.example", "A"))
                other.id = q.id
                other.answer.append(
                    dns.rrset.from_text("evil.example.", 60, "IN", "A", "203.0.113.67")
                )
                self.sock.sendto(other.to_wire(), addr)
            if self.delay:
                threading.Timer(self.delay, self._send, (wire, addr)).start()
            else:
                self._send(wire, addr)

    def _send(self, wire: bytes, addr: tuple[str, int]) -> None:
        # A delayed answer may come due after close(): it is simply never sent.
        with contextlib.suppress(OSError):
            self.sock.sendto(wire, addr)

    def close(self) -> None:
        self._stop = True
        self.sock.close()

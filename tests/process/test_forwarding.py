"""Forwarding against a running ``interceptor serve``: TCP to upstreams (forced, and as the
fallback for truncated answers) on pooled, pipelined connections; slow upstreams; the
kube-dns ConfigMap; autopath for a pod whose address the source knows; and the request,
upstream and autopath figures on /metrics.

The upstream is either the real dnsmasq (its query log counts what reaches it) or
:class:`TcpUdpUpstream`, an in-process server that can answer out of order, truncate UDP,
delay names, and counts its TCP connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devlab.netns import stop
from interceptor.resolve.upstream import Forwarder, TcpPool, UpstreamFailed
from interceptor.settings import Endpoint, UpstreamSettings
from tests.helpers import DATA, Dnsmasq, ask, free_tcp_ports, start_serve


def ip_of(name: str) -> str:
    """A distinct answer per name, so a reply matched to the wrong query shows."""
    h = hashlib.sha256(name.lower().encode()).digest()
    return f"198.51.{h[0]}.{h[1]}"


def _udp_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free loopback port: the kernel picks the UDP port,
    and that number may already be taken for TCP (another test's listener), so try again."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError("no loopback port free for both UDP and TCP")


class TcpUdpUpstream:
    """A nameserver on one loopback port, UDP and TCP, answering every A question with
    :func:`ip_of` (TTL 60).  ``delays`` hold replies back per name (on TCP each reply is sent
    when its own delay is over, so pipelined answers leave out of order); ``truncate_udp``
    answers UDP with TC and no records; ``close_after`` closes a TCP connection after that
    many replies; ``first_delay`` holds back only the very first query received."""

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}
        self.first_delay = 0.0
        self.truncate_udp = False
        self.close_after = 0
        self.udp_queries: list[tuple[str, int, int]] = []
        """(name, ID, source port)"""
        self.tcp_queries: list[str] = []
        self.connections = 0
        self.max_pipelined = 0
        self._lock = threading.Lock()
        self.udp, self.tcp = _udp_tcp_pair()
        self.port = int(self.udp.getsockname()[1])
        self.tcp.listen(64)
        self._stop = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve_udp, daemon=True).start()
        threading.Thread(target=self._accept, daemon=True).start()

    def answer(self, data: bytes) -> tuple[str, bytes]:
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text(omit_final_dot=True)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", ip_of(name)))
        return name, r.to_wire()

    def delay_for(self, name: str) -> float:
        with self._lock:
            first = self.first_delay
            self.first_delay = 0.0
        return first or self.delays.get(name.lower(), 0.0)

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, addr = self.udp.recvfrom(4096)
            except OSError:
                return
            name, wire = self.answer(data)
            self.udp_queries.append((name, int.from_bytes(data[:2], "big"), addr[1]))
            if self.truncate_udp:
                r = dns.message.from_wire(wire)
                r.answer.clear()
                r.flags |= dns.flags.TC
                wire = r.to_wire()
            threading.Timer(self.delay_for(name), self._sendto, (wire, addr)).start()

    def _sendto(self, wire: bytes, addr: tuple[str, int]) -> None:
        try:
            self.udp.sendto(wire, addr)
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        state = {"inflight": 0, "sent": 0}

        def reply(wire: bytes) -> None:
            with lock:
                try:
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
                except OSError:
                    return
                state["inflight"] -= 1
                state["sent"] += 1
                if self.close_after and state["sent"] >= self.close_after:
                    conn.shutdown(socket.SHUT_RDWR)

        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                size = struct.unpack("!H", buf[:2])[0]
                data, buf = buf[2 : 2 + size], buf[2 + size :]
                name, wire = self.answer(data)
                self.tcp_queries.append(name)
                with lock:
                    state["inflight"] += 1
                    self.max_pipelined = max(self.max_pipelined, state["inflight"])
                threading.Timer(self.delay_for(name), reply, (wire,)).start()

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def fake() -> Iterator[TcpUdpUpstream]:
    up = TcpUdpUpstream()
    yield up
    up.close()


def ask_many(port: int, names: list[str], timeout: float = 5) -> list[dns.message.Message]:
    with cf.ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: ask("127.0.0.1", port, n, timeout=timeout), names))


def addresses(m: dns.message.Message) -> list[str]:
    return [r.to_text() for rr in m.answer if rr.rdtype == 1 for r in rr]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------- TCP pool


def test_force_tcp_pipelines_on_few_connections(fake: TcpUdpUpstream) -> None:
    # Every third name is held back, so replies on a connection come out of order.
    names = [f"n{i}.example" for i in range(60)]
    fake.delays = {n: 0.15 for n in names[::3]}
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}", "--force-tcp")
    try:
        for m, name in zip(ask_many(s.port, names), names, strict=True):
            assert addresses(m) == [ip_of(name)], name
        assert fake.udp_queries == []
        assert sorted(fake.tcp_queries) == sorted(names)
        assert 1 <= fake.connections <= 4, fake.connections
        assert fake.max_pipelined > 1  # several queries in flight on one connection
        used = fake.connections
        more = [f"m{i}.example" for i in range(20)]
        for m, name in zip(ask_many(s.port, more), more, strict=True):
            assert addresses(m) == [ip_of(name)]
        assert fake.connections == used  # reused, not reopened
    finally:
        stop(s.proc)


def test_truncated_udp_answer_is_asked_again_over_tcp(fake: TcpUdpUpstream) -> None:
    fake.truncate_udp = True
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}")
    try:
        m = ask(s.host, s.port, "big.example")
        assert addresses(m) == [ip_of("big.example")] and not m.flags & dns.flags.TC
        assert [q[0] for q in fake.udp_queries] == ["big.example"]
        assert fake.tcp_queries == ["big.example"]
    finally:
        stop(s.proc)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_pool_replaces_a_connection_the_server_closed(fake: TcpUdpUpstream) -> None:
    fake.close_after = 1  # the server closes each connection after one answer

    async def go() -> list[bytes]:
        pool = TcpPool(Endpoint("127.0.0.1", fake.port))
        try:
            out = []
            for i in range(3):
                q = dns.message.make_query(f"c{i}.example", "A").to_wire()
                out.append(await asyncio.wait_for(pool.query(q), 2))
                await asyncio.sleep(0.05)
            return out
        finally:
            pool.close()

    replies = run(go())
    assert isinstance(replies, list)
    assert [addresses(dns.message.from_wire(r)) for r in replies] == [
        [ip_of(f"c{i}.example")] for i in range(3)
    ]
    assert fake.connections == 3


def test_pool_closes_idle_connections(fake: TcpUdpUpstream) -> None:
    async def go() -> tuple[int, int]:
        pool = TcpPool(Endpoint("127.0.0.1", fake.port), idle=0.3)
        q = dns.message.make_query("idle.example", "A").to_wire()
        await pool.query(q)
        before = len(pool.conns)
        await asyncio.sleep(0.8)
        after = len(pool.conns)
        await pool.query(q)  # and a new one is opened when needed
        pool.close()
        return before, after

    assert run(go()) == (1, 0)
    assert fake.connections == 2


def test_pool_attempt_timeout_and_a_late_reply(fake: TcpUdpUpstream) -> None:
    fake.delays = {"slow.example": 0.6}

    async def go() -> tuple[bool, list[str]]:
        fwd = Forwarder(UpstreamSettings(timeout=0.3, attempts=1, force_tcp=True))
        q = dns.message.make_query("slow.example", "A").to_wire()
        try:
            await fwd.forward(q, [Endpoint("127.0.0.1", fake.port)])
            failed = False
        except UpstreamFailed:
            failed = True
        # The late reply arrives on the pooled connection and is dropped; the connection
        # keeps serving.
        await asyncio.sleep(0.5)
        ok = await fwd.forward(
            dns.message.make_query("fast.example", "A").to_wire(),
            [Endpoint("127.0.0.1", fake.port)],
        )
        fwd.close()
        return failed, addresses(dns.message.from_wire(ok))

    assert run(go()) == (True, [ip_of("fast.example")])
    assert fake.connections == 1


# ------------------------------------------------------------- slow upstreams


def test_slow_upstream_answers_within_the_bound(fake: TcpUdpUpstream) -> None:
    fake.delays = {"slow.example": 0.5}
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}", "--upstream-timeout", "1")
    try:
        t0 = time.monotonic()
        m = ask(s.host, s.port, "slow.example", timeout=5)
        took = time.monotonic() - t0
        assert addresses(m) == [ip_of("slow.example")]
        assert 0.5 <= took < 0.9, took
        assert len(fake.udp_queries) == 1  # no second attempt was needed
    finally:
        stop(s.proc)


def test_reply_after_the_attempt_timeout_goes_to_the_next_attempt(
    fake: TcpUdpUpstream,
) -> None:
    fake.first_delay = 0.7  # the first attempt's reply comes after its 0.4 s timeout
    (mport,) = free_tcp_ports(1)
    s = start_serve(
        "--upstream",
        f"127.0.0.1:{fake.port}",
        "--upstream-timeout",
        "0.4",
        "--metrics-address",
        f"127.0.0.1:{mport}",
    )
    try:
        t0 = time.monotonic()
        m = ask(s.host, s.port, "late.example", timeout=5)
        took = time.monotonic() - t0
        assert addresses(m) == [ip_of("late.example")]
        assert 0.4 <= took < 0.7, took  # answered by the second attempt
        (_, id1, port1), (_, id2, port2) = fake.udp_queries
        assert port1 != port2  # a fresh socket (and ID, but it may repeat) per attempt
        time.sleep(0.4)  # the first reply reaches a closed socket
        metrics = scrape(mport)
        server = ("server", f"127.0.0.1:{fake.port}")
        attempts = "interceptor_upstream_requests_total"
        assert metrics[(attempts, (("outcome", "timeout"), server))] == 1
        assert metrics[(attempts, (("outcome", "ok"), server))] == 1
    finally:
        stop(s.proc)


# ---------------------------------------------------------- kube-dns ConfigMap


def configmap(stub: dict[str, int], upstream: int | None = None) -> str:
    stubs = ", ".join(f'"{z}": ["127.0.0.1:{p}"]' for z, p in stub.items())
    text = f"apiVersion: v1\nkind: ConfigMap\ndata:\n  stubDomains: '{{{stubs}}}'\n"
    if upstream is not None:
        text += f"  upstreamNameservers: '[\"127.0.0.1:{upstream}\"]'\n"
    return text


def test_kube_dns_configmap_is_followed(
    tmp_path: Path, fake: TcpUdpUpstream, upstream: Dnsmasq
) -> None:
    cm = tmp_path / "kube-dns.yaml"
    cm.write_text(configmap({"acme.example": fake.port}, upstream=upstream.port))
    # --upstream is not given: upstreamNameservers replaces the node's resolv.conf.
    s = start_serve("--kube-dns-config", str(cm))
    try:
        assert addresses(ask(s.host, s.port, "a.acme.example")) == [ip_of("a.acme.example")]
        assert addresses(ask(s.host, s.port, "www.upstream.test")) == ["192.0.2.53"]
        assert upstream.queries("a.acme.example") == []
        # An edit (a ConfigMap volume is updated in place) is picked up while running.
        cm.write_text(configmap({"other.example": fake.port}, upstream=upstream.port))
        deadline = time.monotonic() + 10
        while "kube-dns ConfigMap applied" not in s.log_text():
            assert time.monotonic() < deadline, s.log_text()
            time.sleep(0.2)
        assert addresses(ask(s.host, s.port, "b.other.example")) == [ip_of("b.other.example")]
        # A broken edit is reported and the last good configuration stays.
        cm.write_text("data: {stubDomains: '{broken'}\n")
        deadline = time.monotonic() + 10
        while "not applied, keeping the previous one" not in s.log_text():
            assert time.monotonic() < deadline, s.log_text()
            time.sleep(0.2)
        assert addresses(ask(s.host, s.port, "c.other.example")) == [ip_of("c.other.example")]
    finally:
        stop(s.proc)


def test_bad_kube_dns_configmap_is_a_clear_error(tmp_path: Path) -> None:
    cm = tmp_path / "kube-dns.yaml"
    cm.write_text("data:\n  upstreamNameservers: '[\"dns.google\"]'\n")
    with pytest.raises(AssertionError) as info:
        start_serve("--kube-dns-config", str(cm), timeout=10)
    text = str(info.value)
    assert "upstreamNameservers: 'dns.google': 'dns.google' is not an IP address" in text
    assert "Traceback" not in text


# ------------------------------------------------------------------- autopath


POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: local-client, namespace: ns1}
spec: {nodeName: node-1}
status: {podIP: 127.0.0.2}
"""


@pytest.fixture
def pod_source(tmp_path: Path) -> Path:
    """The test cluster plus a pod at 127.0.0.2, so a loopback client is a known pod."""
    path = tmp_path / "cluster.yaml"
    path.write_text((DATA / "cluster.yaml").read_text() + POD)
    return path


def ask_from(port: int, name: str, rtype: str = "A", src: str = "127.0.0.2") -> dns.message.Message:
    q = dns.message.make_query(name, rtype)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=5, source=src)


def test_autopath_and_request_figures(pod_source: Path, upstream: Dnsmasq, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch corp.upstream.test\n")
    (mport,) = free_tcp_ports(1)
    s = start_serve(
        "--upstream",
        f"127.0.0.1:{upstream.port}",
        "--resolv-conf",
        str(resolv),
        "--metrics-address",
        f"127.0.0.1:{mport}",
        source=pod_source,
    )
    before = len(upstream.queries("www.upstream.test"))  # the dnsmasq is shared
    try:
        m = ask_from(s.port, "www.upstream.test.ns1.svc.cluster.local")
        assert [rr.to_text() for rr in m.answer] == [
            "www.upstream.test.ns1.svc.cluster.local. 30 IN CNAME www.upstream.test.",
            "www.upstream.test. 60 IN A 192.0.2.53",
        ]
        # Cluster candidates never leave the node; the node's search domain and the bare
        # name were asked once each.
        assert len(upstream.queries("www.upstream.test")) == before + 1
        assert len(upstream.queries("www.upstream.test.corp.upstream.test")) == 1
        assert upstream.queries("www.upstream.test.svc.cluster.local") == []
        # Nothing anywhere: NXDOMAIN, so the pod's own search carries on.
        nx = ask_from(s.port, "nope.upstream.test.ns1.svc.cluster.local")
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.answer == []
        # Another client (not a pod) gets the plain answer: junk, NXDOMAIN, not forwarded.
        other = ask_from(s.port, "www.upstream.test.ns1.svc.cluster.local", src="127.0.0.1")
        assert other.rcode() == dns.rcode.NXDOMAIN
        assert len(upstream.queries("www.upstream.test")) == before + 1
        # Hot path, careful path, cache.
        assert ask(s.host, s.port, "svc1.ns1.svc.cluster.local").answer
        assert ask(s.host, s.port, "svc1.ns1.svc.cluster.local", tcp=True).answer
        ask(s.host, s.port, "www.upstream.test")
        metrics = scrape(mport)
    finally:
        stop(s.proc)

    def get(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    req = "interceptor_requests_total"
    assert get(req, proto="udp", qtype="A", rcode="NOERROR", source="authoritative") == 1
    assert get(req, proto="tcp", qtype="A", rcode="NOERROR", source="authoritative") == 1
    # The autopath hit was fetched; the same name asked plainly then came from the cache.
    assert get(req, proto="udp", qtype="A", rcode="NOERROR", source="upstream") == 1
    assert get(req, proto="udp", qtype="A", rcode="NOERROR", source="cache") == 1
    # The autopath miss and the stranger's junk: the cluster's own NXDOMAIN.
    assert get(req, proto="udp", qtype="A", rcode="NXDOMAIN", source="authoritative") == 2
    assert get("interceptor_autopath_total", result="hit") == 1
    assert get("interceptor_autopath_total", result="miss") == 1
    hist = "interceptor_request_duration_seconds"
    assert get(f"{hist}_count", source="authoritative") == 4
    assert get(f"{hist}_bucket", source="authoritative", le="+Inf") == 4
    assert get(f"{hist}_bucket", source="upstream", le="0.0001") == 0  # a real round trip
    server = f"127.0.0.1:{upstream.port}"
    # Two candidates each (node search domain, bare name) for the hit and the miss.
    assert get("interceptor_upstream_requests_total", server=server, outcome="ok") == 4
    assert get("interceptor_upstream_duration_seconds_count", server=server) == 4
    assert get("interceptor_upstream_healthy", server=server) == 1
    assert get("interceptor_build_info", version="0.1.0") == 1

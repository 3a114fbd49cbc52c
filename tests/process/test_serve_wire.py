"""The wire: EDNS, truncation, TCP framing and limits, bad input, upstream failure, signals."""

from __future__ import annotations

import signal
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.helpers import Dnsmasq, Served, ask, start_serve, stop

Z = "cluster.local"
BIG = f"big.ns1.svc.{Z}"  # 40 A records: about 700 bytes


def raw_udp(served: Served, payload: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (served.host, served.port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def header(msg_id: int, flags: int, qd: int, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar)


QUESTION = b"\x04svc1\x03ns1\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"


def test_edns_reply_carries_opt_and_do(served: Served) -> None:
    m = served.ask(f"svc1.ns1.svc.{Z}", use_edns=0, payload=4096, want_dnssec=True)
    assert m.edns == 0 and m.payload == 1232  # our cap, not the client's 4096
    assert m.ednsflags & dns.flags.DO  # RFC 3225: DO copied
    m = served.ask(f"svc1.ns1.svc.{Z}", use_edns=False)
    assert m.edns == -1


def test_truncation_without_edns_and_with_small_buffer(served: Served) -> None:
    # RFC 2181 9: TC, with as many whole records as fit (16 bytes each, owner compressed).
    question = len(BIG) + 2 + 4
    m = served.ask(BIG, use_edns=False)
    assert m.flags & dns.flags.TC and len(m.answer[0]) == (512 - 12 - question) // 16
    m = served.ask(BIG, use_edns=0, payload=600)
    opt = 11
    assert m.flags & dns.flags.TC and len(m.answer[0]) == (600 - 12 - question - opt) // 16
    m = served.ask(BIG, use_edns=0, payload=1232)
    assert not m.flags & dns.flags.TC and len(m.answer[0]) == 40
    m = served.ask(BIG, tcp=True, use_edns=False)
    assert not m.flags & dns.flags.TC and len(m.answer[0]) == 40


def test_badvers(served: Served) -> None:
    q = dns.message.make_query(f"svc1.ns1.svc.{Z}", "A", use_edns=1)
    reply = raw_udp(served, q.to_wire())
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.rcode() == dns.rcode.BADVERS and m.edns == 0


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (header(1, 0x0100, 0), dns.rcode.FORMERR),
        (header(2, 0x0100, 2) + QUESTION + QUESTION, dns.rcode.FORMERR),
        (header(3, 0x0100, 1) + QUESTION[:9], dns.rcode.FORMERR),
        (header(4, 0x0100, 1) + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
        (header(5, 0x0100, 1) + QUESTION + b"junk", dns.rcode.FORMERR),
        (header(6, 0x2000, 1) + QUESTION, dns.rcode.NOTIMP),  # opcode 4 NOTIFY
        (header(7, 0x1000, 1) + QUESTION, dns.rcode.NOTIMP),  # opcode 2 STATUS
        (header(8, 0x0100, 1, an=1) + QUESTION, dns.rcode.FORMERR),
    ],
    ids=["qd0", "qd2", "short-question", "pointer", "trailing", "notify", "status", "an1"],
)
def test_bad_queries_get_an_error_rcode(served: Served, payload: bytes, expected: int) -> None:
    reply = raw_udp(served, payload)
    assert reply is not None
    msg_id, flags = struct.unpack("!HH", reply[:4])
    assert msg_id == struct.unpack("!H", payload[:2])[0]
    assert flags & 0x8000 and flags & 0xF == expected


def test_responses_and_runts_are_never_answered(served: Served) -> None:
    assert raw_udp(served, header(9, 0x8180, 1) + QUESTION, timeout=0.5) is None
    assert raw_udp(served, b"\x00\x01\x02", timeout=0.5) is None


def test_garbage_flood_costs_few_log_lines_and_no_service(served: Served) -> None:
    before = len(served.log)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            s.sendto(header(i, 0x0100, 3) + bytes(range(i % 50)), (served.host, served.port))
    assert served.ask(f"svc1.ns1.svc.{Z}").answer  # still answering
    time.sleep(0.2)
    new = served.log[before:]
    assert len(new) < 10, new
    assert not any("Traceback" in ln for ln in served.log)


def _tcp_frames(sock: socket.socket, count: int) -> list[dns.message.Message]:
    buf = b""
    out = []
    while len(out) < count:
        chunk = sock.recv(65535)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            size = struct.unpack("!H", buf[:2])[0]
            out.append(dns.message.from_wire(buf[2 : 2 + size]))
            buf = buf[2 + size :]
    return out


def test_tcp_pipelined_queries_on_one_connection(served: Served, upstream: Dnsmasq) -> None:
    names = [f"svc1.ns1.svc.{Z}", f"dual.ns1.svc.{Z}", "www.upstream.test", f"nope.{Z}"] * 5
    wire = b""
    ids = []
    for i, name in enumerate(names):
        q = dns.message.make_query(name, "A")
        q.id = 1000 + i
        ids.append(q.id)
        data = q.to_wire()
        wire += struct.pack("!H", len(data)) + data
    with socket.create_connection((served.host, served.port), timeout=5) as s:
        s.sendall(wire)
        replies = _tcp_frames(s, len(names))
    assert sorted(r.id for r in replies) == ids
    by_id = {r.id: r for r in replies}
    for i, name in enumerate(names):
        assert by_id[1000 + i].question[0].name.to_text() == name + "."


def test_tcp_idle_timeout_and_connection_limit(upstream: Dnsmasq) -> None:
    s = start_serve(
        "--upstream",
        f"127.0.0.1:{upstream.port}",
        "--tcp-idle-timeout",
        "0.5",
        "--tcp-max-connections",
        "3",
    )
    try:
        idle = socket.create_connection((s.host, s.port), timeout=5)
        t0 = time.monotonic()
        assert idle.recv(10) == b""  # closed by the server
        assert 0.3 < time.monotonic() - t0 < 3
        idle.close()
        conns = [socket.create_connection((s.host, s.port), timeout=5) for _ in range(3)]
        time.sleep(0.1)
        extra = socket.create_connection((s.host, s.port), timeout=5)
        assert extra.recv(10) == b""  # over the limit: closed at once
        extra.close()
        for c in conns:
            c.close()
        assert ask(s.host, s.port, f"svc1.ns1.svc.{Z}", tcp=True).answer
    finally:
        stop(s.proc)


def test_upstream_timeout_gives_servfail() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))  # receives, never answers
        port = blackhole.getsockname()[1]
        s = start_serve("--upstream", f"127.0.0.1:{port}", "--upstream-timeout", "0.3")
        try:
            t0 = time.monotonic()
            m = ask(s.host, s.port, "www.example.invalid", timeout=5)
            assert m.rcode() == dns.rcode.SERVFAIL
            assert time.monotonic() - t0 < 2
            assert ask(s.host, s.port, f"svc1.ns1.svc.{Z}").answer  # cluster names unaffected
        finally:
            stop(s.proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_quickly(sig: signal.Signals) -> None:
    s = start_serve("--upstream", "127.0.0.1:9")
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    assert s.proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 2

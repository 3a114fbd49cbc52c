"""A DNS packet fuzzer: mutated and random messages at a server over UDP and TCP, every reply
checked with dnspython's strict parser, valid queries interleaved and checked for the right
answer, and the server's memory watched.

Used by the process tier (a short run against ``interceptor serve``) and by
``python -m tests.bench.fuzz`` (the full run).  Seeded: a failure reproduces.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.message
import dns.rdatatype

if TYPE_CHECKING:
    from devlab.netns import Lab

BASE_NAMES = (
    "svc1.ns1.svc.cluster.local",
    "_http._tcp.svc1.ns1.svc.cluster.local",
    "hdls.ns1.svc.cluster.local",
    "1.1.96.10.in-addr.arpa",
    "auto.mesh.test",
    "www.upstream.test",
    "example.com.ns1.svc.cluster.local",
)
TYPES = ("A", "AAAA", "SRV", "PTR", "TXT", "ANY", "CNAME", "SOA", "NS")


def seeds() -> list[bytes]:
    """Valid queries the mutations start from: plain, EDNS, DO, several types."""
    out = []
    for name in BASE_NAMES:
        for rtype in TYPES[:5]:
            for edns in (-1, 0):
                q = dns.message.make_query(name, rtype, use_edns=edns, want_dnssec=edns == 0)
                out.append(q.to_wire())
    return out


def mutate(msg: bytes, rng: random.Random) -> bytes:
    b = bytearray(msg)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if not b:
            b += rng.randbytes(rng.randint(1, 40))
        elif op < 0.30:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.45:  # a random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.55:  # cut
            del b[rng.randrange(len(b)) :]
        elif op < 0.65:  # insert junk
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 30))
        elif op < 0.72:  # header counts
            i = rng.choice((4, 6, 8, 10))
            if len(b) >= i + 2:
                struct.pack_into("!H", b, i, rng.choice((0, 1, 2, 255, 65535)))
        elif op < 0.80:  # flags: QR, opcode, TC, rcode bits
            if len(b) >= 4:
                b[2], b[3] = rng.randrange(256), rng.randrange(256)
        elif op < 0.87:  # compression pointer somewhere (loops, forward, out of range)
            if len(b) > 13:
                i = rng.randrange(12, len(b) - 1)
                ptr = 0xC000 | rng.choice((12, i, len(b) + 5, rng.randrange(0x3FFF)))
                struct.pack_into("!H", b, i, ptr)
        elif op < 0.94:  # a long label or name
            i = rng.randrange(12, max(13, len(b)))
            b[i:i] = bytes([63]) + b"a" * 63 * rng.randint(1, 5)
        else:  # duplicate a chunk
            i = rng.randrange(len(b))
            b += b[i : i + rng.randint(1, 64)]
    return bytes(b[:4096])


def _name(rng: random.Random) -> bytes:
    """A question name, often an odd one: upper case, long labels, bytes a hostname never
    has (dots, NULs, spaces inside a label), the 255-byte limit, or the root."""
    pick = rng.random()
    if pick < 0.05:
        return b"\0"
    labels = rng.choice(BASE_NAMES).split(".")
    out = [lb.encode() for lb in labels]
    if pick < 0.25:
        out = [lb.upper() if rng.random() < 0.5 else lb for lb in out]
    elif pick < 0.45:
        i = rng.randrange(len(out))
        out[i] = bytes(rng.choice(b"a.\0 \\\xff-_*") for _ in range(rng.randint(1, 63)))
    elif pick < 0.55:
        while sum(len(lb) + 1 for lb in out) < 250:
            out.insert(0, b"x" * rng.randint(1, 63))
    return b"".join(bytes([len(lb)]) + lb for lb in out) + b"\0"


def _opt(rng: random.Random) -> bytes:
    """An OPT record: odd sizes, versions and flags, options known and unknown, lengths that
    lie (client subnet, cookie, padding, keepalive, an unassigned code)."""
    options = b""
    for _ in range(rng.randint(0, 3)):
        code = rng.choice((8, 10, 11, 12, 15, 65001, rng.randrange(65536)))
        data = rng.randbytes(rng.choice((0, 2, 4, 8, 40)))
        length = len(data) if rng.random() < 0.8 else rng.randrange(80)
        options += struct.pack("!HH", code, length) + data
    version = 0 if rng.random() < 0.8 else rng.randrange(256)
    ttl = (rng.randrange(256) << 24) | (version << 16) | rng.choice((0, 0x8000, 0xFFFF))
    return b"\0" + struct.pack("!HHIH", 41, rng.choice((0, 1, 512, 1232, 4096, 65535)), ttl,
                                len(options)) + options  # fmt: skip


def structured(rng: random.Random) -> bytes:
    """A query that parses but asks for trouble: several questions, odd opcodes, classes and
    types, QR set, records in the answer or authority section, one or two OPT records (or one
    in the wrong section), a TSIG-like record, trailing bytes."""
    qd = rng.choice((1, 1, 1, 2, 0))
    flags = 0x0100 | (rng.choice((0, 0, 0, 1, 2, 4, 5, 15)) << 11)
    if rng.random() < 0.1:
        flags |= 0x8000
    if rng.random() < 0.2:
        flags |= rng.choice((0x0010, 0x0020, 0x0200, 0x0400, 0x0040))
    body = b""
    for _ in range(qd):
        qtype = rng.choice((1, 28, 33, 12, 16, 255, 5, 6, 2, 0, 251, 252, 249, 250, 65535, 64, 65))
        qclass = rng.choice((1, 1, 1, 3, 4, 254, 255))
        body += _name(rng) + struct.pack("!HH", qtype, qclass)
    an = ns = ar = 0
    if rng.random() < 0.15:
        an = 1
        body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + rng.randbytes(4)
    if rng.random() < 0.1:
        ns = 1
        body += _opt(rng) if rng.random() < 0.5 else b"\0" + struct.pack("!HHIH", 6, 1, 0, 0)
    for _ in range(rng.choice((0, 1, 1, 1, 2))):
        ar += 1
        body += _opt(rng)
    if rng.random() < 0.05:
        ar += 1  # TSIG-shaped, unsigned nonsense
        body += _name(rng) + struct.pack("!HHIH", 250, 255, 0, 8) + rng.randbytes(8)
    if rng.random() < 0.1:
        body += rng.randbytes(rng.randint(1, 20))
    head = struct.pack("!HHHHHH", rng.randrange(65536), flags, qd, an, ns, ar)
    return head + body


def packet(rng: random.Random, base: list[bytes]) -> bytes:
    pick = rng.random()
    if pick < 0.1:
        return rng.randbytes(rng.randint(0, 600))
    if pick < 0.4:
        msg = structured(rng)
        return mutate(msg, rng) if rng.random() < 0.3 else msg
    return mutate(rng.choice(base), rng)


@dataclass
class Results:
    sent: int = 0
    replies: int = 0
    rejected: list[tuple[bytes, bytes, str]] = field(default_factory=list)
    """(query, reply, dnspython's complaint) of every reply its strict parser refused."""
    probes: int = 0
    probe_failures: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


def strict_check(query: bytes, reply: bytes, out: Results) -> None:
    out.replies += 1
    try:
        dns.message.from_wire(reply)
    except (dns.exception.DNSException, ValueError, struct.error, IndexError) as exc:
        out.rejected.append((query, reply, f"{type(exc).__name__}: {exc}"))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status in KiB (VmRSS, or VmHWM for the peak); 0 when
    the process has none (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def probe(host: str, port: int, family: int, out: Results) -> None:
    """A valid query among the fuzz must still get the right answer."""
    out.probes += 1
    q = dns.message.make_query("svc1.ns1.svc.cluster.local", "A")
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        try:
            s.sendto(q.to_wire(), (host, port))
            r = dns.message.from_wire(s.recv(4096))
        except (OSError, dns.exception.DNSException) as exc:
            out.probe_failures.append(f"{type(exc).__name__}: {exc}")
            return
    got = [rr.to_text() for rrset in r.answer for rr in rrset]
    if r.id != q.id or got != ["10.96.1.1"]:
        out.probe_failures.append(f"wrong answer {got}")


def fuzz_udp(
    host: str, port: int, count: int, seed: int, pid: int | None = None, rate: float = 4000
) -> Results:
    """``count`` packets at ``rate`` a second, replies read as they come."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random(seed)
    base = seeds()
    out = Results()
    sent: dict[int, bytes] = {}  # by ID: the last query with it, to report a bad reply's query
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        t0 = time.monotonic()
        for i in range(count):
            data = packet(rng, base)
            if len(data) >= 2:
                sent[struct.unpack_from("!H", data)[0]] = data
            try:
                s.sendto(data, (host, port))
            except OSError:
                pass
            out.sent += 1
            if i % 1000 == 0:
                probe(host, port, family, out)
                if pid is not None:
                    out.rss_kib.append(rss_kib(pid))
            _drain(s, sent, out)
            ahead = out.sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            select.select([s], [], [], 0.1)
            _drain(s, sent, out)
    probe(host, port, family, out)
    if pid is not None:
        out.rss_kib.append(rss_kib(pid))
    return out


def _drain(s: socket.socket, sent: dict[int, bytes], out: Results) -> None:
    while True:
        try:
            reply = s.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue
        qid = struct.unpack_from("!H", reply)[0] if len(reply) >= 2 else -1
        strict_check(sent.get(qid, b""), reply, out)


def fuzz_tcp(
    host: str, port: int, count: int, seed: int, pid: int | None = None, batch: int = 50
) -> Results:
    """``count`` messages over TCP in pipelined batches: framed fuzz (and sometimes a lying
    length prefix), on connections reopened whenever the server closes one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random(seed)
    base = seeds()
    out = Results()
    while out.sent < count:
        if pid is not None and out.sent % 1000 < batch:
            out.rss_kib.append(rss_kib(pid))
        with socket.create_connection((host, port), timeout=2) as conn:
            queries = []
            framed = b""
            for _ in range(min(batch, count - out.sent)):
                data = packet(rng, base)
                queries.append(data)
                length = len(data) if rng.random() > 0.03 else rng.randrange(65536)
                framed += struct.pack("!H", length) + data
                out.sent += 1
            by_id = {struct.unpack_from("!H", q)[0]: q for q in queries if len(q) >= 2}
            buf = b""
            try:
                conn.sendall(framed)
                conn.shutdown(socket.SHUT_WR)  # no more queries: the server answers, closes
                conn.settimeout(2)
                while chunk := conn.recv(65535):
                    buf += chunk
            except OSError:
                pass  # reset or timed out: what arrived is still checked
            while len(buf) >= 2:
                (n,) = struct.unpack_from("!H", buf)
                if len(buf) < 2 + n:
                    break
                reply = buf[2 : 2 + n]
                qid = struct.unpack_from("!H", reply)[0] if n >= 2 else -1
                strict_check(by_id.get(qid, b""), reply, out)
                buf = buf[2 + n :]
    probe(host, port, family, out)
    if pid is not None:
        out.rss_kib.append(rss_kib(pid))
    return out


def from_pod(
    lab: Lab, pod: str, proto: str, host: str, n: int, seed: int, rate: float, pid: int
) -> Results:
    """Run tests/fuzzing.py in ``pod``'s namespace and read its results."""
    import json
    import sys

    r = lab.run_in_pod(
        pod, sys.executable, "-m", "tests.fuzzing", "--proto", proto, "--host", host,
        "--count", str(n), "--seed", str(seed), "--rate", str(rate), "--pid", str(pid),
        timeout=n / rate * 3 + 300,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    d = json.loads(r.stdout)
    out = Results(sent=d["sent"], replies=d["replies"], probes=d["probes"])
    out.probe_failures = d["probe_failures"]
    out.rss_kib = d["rss_kib"]
    out.rejected = [(bytes.fromhex(q), bytes.fromhex(a), why) for q, a, why in d["rejected"]]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one fuzz from wherever this process is (a pod's namespace, for the BPF path) and
    print its results as JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tests.fuzzing")
    p.add_argument("--proto", choices=("udp", "tcp"), default="udp")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=4000)
    p.add_argument("--pid", type=int, default=None, help="whose RSS to watch")
    args = p.parse_args(argv)
    if args.proto == "udp":
        r = fuzz_udp(args.host, args.port, args.count, args.seed, args.pid, args.rate)
    else:
        r = fuzz_tcp(args.host, args.port, args.count, args.seed, args.pid)
    print(json.dumps({
        "sent": r.sent, "replies": r.replies, "probes": r.probes,
        "probe_failures": r.probe_failures, "rss_kib": r.rss_kib,
        "rejected": [(q.hex(), a.hex(), why) for q, a, why in r.rejected],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Upstreams that misbehave: wrong IDs or questions, truncated garbage, oversized replies,
SERVFAIL and REFUSED, a flood of forged replies, and records for names nobody asked about.
The resolver neither crashes nor poisons its cache: only the asked question is cached, and
out-of-bailiwick records are never used for another name.  Each query upstream has a random
ID and source port (their spread is checked)."""

from __future__ import annotations

import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from devlab.netns import stop
from tests.helpers import Served, ask, start_serve

TRUE_IP = "192.0.2.10"
FORGED_IP = "203.0.113.66"


class Liar:
    """A UDP nameserver on loopback whose misbehaviour depends on the name asked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.asked: list[tuple[str, int, int]] = []
        """(name, ID, source port) of every query received."""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                q = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - the resolver never sends garbage; ignore
                continue
            name = q.question[0].name.to_text(omit_final_dot=True).lower()
            self.asked.append((name, q.id, addr[1]))
            for wire in self.replies(q, name):
                self.sock.sendto(wire, addr)

    def replies(self, q: dns.message.Message, name: str) -> list[bytes]:
        good = dns.message.make_response(q)
        good.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", TRUE_IP))
        lies: list[bytes] = []
        label = name.split(".")[0]
        if label == "wrongid":
            bad = dns.message.make_response(q)
            bad.id = (q.id + 1) & 0xFFFF
            bad.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", FORGED_IP))
            lies.append(bad.to_wire())
        elif label == "wrongq":
            other = dns.message.make_query("other.example", "A")
            other.id = q.id
            bad = dns.message.make_response(other)
            bad.answer.append(dns.rrset.from_text("other.example.", 60, "IN", "A", FORGED_IP))
            lies.append(bad.to_wire())
        elif label == "garbage":
            lies.append(good.to_wire()[:7])
            lies.append(good.to_wire()[:2] + random.randbytes(40))
        elif label == "forged":
            for i in range(200):
                bad = dns.message.make_response(q)
                bad.id = (q.id + 1 + i) & 0xFFFF
                bad.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", FORGED_IP))
                lies.append(bad.to_wire())
        elif label == "oversize":
            many = [f"192.0.2.{i % 250 + 1}" for i in range(300)]
            good.answer = [dns.rrset.from_text(q.question[0].name, 60, "IN", "A", *many)]
            return [good.to_wire(max_size=65535)]
        elif label in ("servfail", "refused"):
            good.answer.clear()
            good.set_rcode(dns.rcode.SERVFAIL if label == "servfail" else dns.rcode.REFUSED)
        elif label == "bailiwick":
            good.additional.append(
                dns.rrset.from_text("victim.example.", 3600, "IN", "A", FORGED_IP)
            )
            good.authority.append(
                dns.rrset.from_text("victim.example.", 3600, "IN", "NS", "ns.evil.example.")
            )
        return [*lies, good.to_wire()]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def liar() -> Iterator[Liar]:
    up = Liar()
    yield up
    up.close()


@pytest.fixture(scope="module")
def served(liar: Liar) -> Iterator[Served]:
    s = start_serve("--upstream", f"127.0.0.1:{liar.port}", "--upstream-timeout", "1")
    yield s
    assert s.proc.poll() is None, "\n".join(s.log[-20:])  # still running
    stop(s.proc)


def a_records(m: dns.message.Message) -> list[str]:
    return [r.to_text() for rr in m.answer if rr.rdtype == 1 for r in rr]


@pytest.mark.parametrize("label", ["wrongid", "wrongq", "garbage", "forged"])
def test_lies_before_the_answer_are_ignored(served: Served, label: str) -> None:
    for _ in range(2):  # asked, then from the cache: the same, true answer
        m = ask(served.host, served.port, f"{label}.example")
        assert m.rcode() == dns.rcode.NOERROR and a_records(m) == [TRUE_IP]


def test_an_oversized_reply_reaches_the_client_cut_to_fit(served: Served) -> None:
    m = ask(served.host, served.port, "oversize.example")
    assert m.flags & dns.flags.TC and 0 < len(a_records(m)) < 300
    full = ask(served.host, served.port, "oversize.example", tcp=True, timeout=5)
    assert len(a_records(full)) == 250  # 300 records, 250 distinct addresses


@pytest.mark.parametrize("label", ["servfail", "refused"])
def test_servfail_and_refused_are_passed_on_not_cached(
    served: Served, liar: Liar, label: str
) -> None:
    name = f"{label}.example"
    before = sum(1 for n, _, _ in liar.asked if n == name)
    for _ in range(2):
        m = ask(served.host, served.port, name)
        assert m.rcode() != dns.rcode.NOERROR
    assert sum(1 for n, _, _ in liar.asked if n == name) == before + 2  # asked each time


def test_out_of_bailiwick_records_are_never_used_for_another_name(
    served: Served, liar: Liar
) -> None:
    assert a_records(ask(served.host, served.port, "bailiwick.example")) == [TRUE_IP]
    m = ask(served.host, served.port, "victim.example")
    assert a_records(m) == [TRUE_IP]  # asked upstream, not taken from the other reply
    assert any(n == "victim.example" for n, _, _ in liar.asked)


def test_ids_and_source_ports_are_random(served: Served, liar: Liar) -> None:
    start = len(liar.asked)
    for i in range(600):
        ask(served.host, served.port, f"n{i}.spread.example")
    seen = [(qid, port) for n, qid, port in liar.asked[start:] if n.endswith(".spread.example")]
    ids = [qid for qid, _ in seen]
    ports = [port for _, port in seen]
    assert len(seen) == 600
    # 600 draws from 65,536 IDs: a handful of repeats at most; ports from the kernel's
    # ephemeral range the same.  Each of the 16 high-nibble bins of the ID gets its share.
    assert len(set(ids)) >= 590 and len(set(ports)) >= 550, (len(set(ids)), len(set(ports)))
    bins = Counter(qid >> 12 for qid in ids)
    assert min(bins.values()) >= 15 and max(bins.values()) <= 70, sorted(bins.values())

"""Per-pod budgets in the kernel: a pod flooding the resolver (captured or at the resolver's
own address) or the kernel's answers loses its excess, counted for it by reason, while its
neighbour keeps resolving; a forged source to the resolver's address is dropped."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

from devlab.netns import RESOLVER_IP
from interceptor.ops.counters import CounterReader
from interceptor.ops.state import read_state
from tests.lab.conftest import Node, dns_query, send_raw, udp_query

SVC1 = "svc1.ns1.svc.cluster.local"
INTERCEPTED = "10.96.1.1"


FLOOD = (
    "import socket, sys\n"
    "q, server, n = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for _ in range(n):\n"
    "    s.sendto(q, (server, 53))\n"
)


def flood(node: Node, pod: str, server: str, name: str, count: int) -> None:
    """``count`` queries for ``name`` as fast as one socket sends them, answers unread."""
    query = dns_query(name, qid=7).hex()
    r = node.lab.run_in_pod(pod, "/usr/bin/python3", "-c", FLOOD, query, server, str(count))
    assert r.returncode == 0, r.stderr


def counters(node: Node) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(reason -> count, pod name -> its per-pod counters), as ``interceptor stats`` reads
    them."""
    with CounterReader(node.pin_dir, lambda: read_state(node.lab.state_dir)) as reader:
        snap = reader.read()
    return snap.counters["REASONS"], {p.name: p.counts for p in snap.pods}


def settle(node: Node, reason: str, before: int) -> dict[str, int]:
    deadline = time.monotonic() + 3
    while True:
        reasons, _ = counters(node)
        if reasons[reason] > before or time.monotonic() > deadline:
            return reasons
        time.sleep(0.05)


def test_a_pod_over_its_query_budget_loses_the_excess_not_its_neighbour(
    fresh_node: Node,
) -> None:
    fresh_node.start_agent("--query-rate", "50", "--no-fastpath")
    before, _ = counters(fresh_node)
    flood(fresh_node, "client1", "10.96.0.10", SVC1, 2000)
    reasons = settle(fresh_node, "query_limited", before["query_limited"])
    limited = reasons["query_limited"] - before["query_limited"]
    assert 2000 - 25 - 50 <= limited < 2000, limited  # the burst (25) and a bit got through
    _, pods = counters(fresh_node)
    assert pods["client1"]["limited"] == limited, pods
    assert fresh_node.answer("client2", SVC1) == [INTERCEPTED]  # the neighbour is served


def test_the_resolvers_own_address_has_the_same_budget(fresh_node: Node) -> None:
    fresh_node.start_agent("--query-rate", "50")
    assert fresh_node.answer("client1", f"@{RESOLVER_IP}", SVC1) == [INTERCEPTED]
    before, _ = counters(fresh_node)
    assert before["direct"] >= 1
    flood(fresh_node, "client1", RESOLVER_IP, SVC1, 2000)
    reasons = settle(fresh_node, "query_limited", before["query_limited"])
    assert reasons["query_limited"] - before["query_limited"] >= 1800
    _, pods = counters(fresh_node)
    assert pods["client1"]["direct"] >= 25  # the burst, at least, was served


def test_a_pod_over_its_answer_budget_loses_the_excess(fresh_node: Node) -> None:
    fresh_node.start_agent("--answer-rate", "50")
    before, _ = counters(fresh_node)
    flood(fresh_node, "client1", "10.96.0.10", SVC1, 2000)
    reasons = settle(fresh_node, "answer_limited", before["answer_limited"])
    assert reasons["answer_limited"] - before["answer_limited"] >= 1800
    assert fresh_node.answer("client2", SVC1) == [INTERCEPTED]


def test_a_forged_source_to_the_resolvers_address_is_dropped(fresh_node: Node) -> None:
    fresh_node.start_agent()
    before, _ = counters(fresh_node)
    send_raw(fresh_node, "client1", "10.244.1.99", RESOLVER_IP, udp_query(SVC1))
    reasons = settle(fresh_node, "spoofed", before["spoofed"])
    assert reasons["spoofed"] == before["spoofed"] + 1
    assert reasons["direct"] == before["direct"]


HOLD = (
    "import socket, sys, time\n"
    "server, n = sys.argv[1], int(sys.argv[2])\n"
    "held, failed = [], 0\n"
    "for _ in range(n):\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "    s.settimeout(0.3)\n"
    "    try:\n"
    "        s.connect((server, 53))\n"
    "        held.append(s)\n"
    "    except OSError:\n"
    "        failed += 1\n"
    "        s.close()\n"
    "print(len(held), failed, flush=True)\n"
    "sys.stdin.readline()\n"  # hold them until told to let go
    "for s in held:\n"
    "    s.close()\n"
    "time.sleep(0.5)\n"
)


@contextlib.contextmanager
def holding_connections(node: Node, pod: str, server: str, n: int) -> Iterator[tuple[int, int]]:
    """Open ``n`` TCP connections from ``pod`` and keep them while the block runs:
    (connected, failed).  They are closed (FINs sent) on the way out."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.lab.pod_ns(pod), "/usr/bin/python3", "-c", HOLD, server,
         str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        held, failed = map(int, proc.stdout.readline().split())
        yield held, failed
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=10)


def tcp_conns(node: Node) -> dict[int, int]:
    """pod id -> the kernel's count of its TCP connections."""
    with node.pinned_maps() as maps:
        return {k.value: v.value for k, v in maps["TCP_CONNS"].items() if v.value}


def no_tcp_conns_within(node: Node, seconds: float) -> dict[int, int]:
    """The kernel's TCP counts once they are all zero, or as they are after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (counts := tcp_conns(node)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def test_a_pods_tcp_connections_are_capped_at_the_syn(fresh_node: Node) -> None:
    """Captured (10.96.0.10) and direct (the resolver's address) connections count alike; the
    SYNs beyond the cap are dropped in the kernel and counted, the neighbour still resolves
    over TCP, and closing them gives the pod its room back."""
    fresh_node.start_agent("--tcp-client-connections", "8")
    before, _ = counters(fresh_node)
    with (
        holding_connections(fresh_node, "client1", "10.96.0.10", 6) as captured,
        holding_connections(fresh_node, "client1", RESOLVER_IP, 6) as direct,
    ):
        assert captured == (6, 0)
        assert direct == (2, 4), direct  # 8 in all, counted either way
        reasons, pods = counters(fresh_node)
        assert reasons["tcp_limited"] - before["tcp_limited"] >= 4  # SYNs and their retries
        assert pods["client1"]["limited"] >= 4
        assert sorted(tcp_conns(fresh_node).values()) == [8]
        assert fresh_node.answer("client2", "+tcp", SVC1) == [INTERCEPTED]
    assert no_tcp_conns_within(fresh_node, 3) == {}  # every FIN released its connection
    with holding_connections(fresh_node, "client1", "10.96.0.10", 3) as again:
        assert again == (3, 0)


PORT_REUSE = (
    "import socket, struct, sys\n"
    "q = bytes.fromhex(sys.argv[1])\n"
    "def tcp(server):\n"
    "    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    c.bind(('0.0.0.0', 40153))\n"
    "    c.settimeout(2)\n"
    "    c.connect((server, 53))\n"
    "    c.sendall(struct.pack('!H', len(q)) + q)\n"
    "    r = c.recv(4096)\n"
    "    c.close()\n"
    "    return socket.inet_ntoa(r[-4:])\n"
    "def udp(server):\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "    s.bind(('0.0.0.0', 40154))\n"
    "    s.connect((server, 53))\n"  # as glibc does: only that server's replies arrive
    "    s.settimeout(2)\n"
    "    s.send(q)\n"
    "    r = s.recv(4096)\n"
    "    s.close()\n"
    "    return socket.inet_ntoa(r[-4:])\n"
    "out = []\n"
    "for ask in (tcp, udp):\n"
    "    for server in ('10.96.0.10', sys.argv[2]):\n"
    "        try:\n"
    "            out.append(ask(server))\n"
    "        except OSError as e:\n"
    "            out.append(type(e).__name__)\n"
    "print(' '.join(out))\n"
)


def test_a_port_that_asked_kube_dns_can_then_ask_the_resolver_directly(
    fresh_node: Node,
) -> None:
    """The same pod port, first to the captured kube-dns address, then to the resolver's own
    address: the second conversation's replies must keep the resolver's address, not be
    "restored" to kube-dns's by the flow the first one left (TCP and UDP)."""
    fresh_node.start_agent("--no-fastpath")
    query = dns_query(SVC1).hex()
    r = fresh_node.lab.run_in_pod("client1", "/usr/bin/python3", "-c", PORT_REUSE, query,
                                  RESOLVER_IP)  # fmt: skip
    assert r.stdout.split() == [INTERCEPTED] * 4, r.stdout + r.stderr


def test_a_leaked_tcp_count_is_taken_back_by_the_agent(fresh_node: Node) -> None:
    """A count the kernel never released (its flow evicted before the FIN): the agent sees it
    above its own count at two passes in a row and lowers it."""
    import ctypes as ct

    fresh_node.start_agent("--tcp-client-connections", "8")
    assert fresh_node.answer("client1", "+tcp", SVC1) == [INTERCEPTED]  # client1 has its id
    with fresh_node.pinned_maps() as maps:
        state = read_state(fresh_node.lab.state_dir)
        assert state is not None
        pod_id = next(p.pod_id for p in state.pods if p.ip == "10.244.1.10")
        maps["TCP_CONNS"].put(ct.c_uint32(pod_id), ct.c_uint32(8))  # eight leaked connections
        assert tcp_conns(fresh_node) == {pod_id: 8}
        with holding_connections(fresh_node, "client1", "10.96.0.10", 1) as capped:
            assert capped == (0, 1)  # the leak holds the pod at its cap...
        assert no_tcp_conns_within(fresh_node, 8) == {}  # ...until the agent takes it back
        with holding_connections(fresh_node, "client1", "10.96.0.10", 2) as room:
            assert room == (2, 0)

"""Per-pod budgets in the kernel: a pod flooding the resolver (captured or at the resolver's
own address) or the kernel's answers loses its excess, counted for it by reason, while its
neighbour keeps resolving; a forged source to the resolver's address is dropped."""

from __future__ import annotations

import time

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

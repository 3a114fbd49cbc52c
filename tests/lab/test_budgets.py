"""Per-pod budgets in the kernel: a pod flooding the resolver (captured or at the resolver's
own address) or the kernel's answers loses its excess, counted for it by reason, while its
neighbour keeps resolving; a forged source to the resolver's address is dropped."""

from __future__ import annotations

import ctypes as ct
import time

from devlab.netns import RESOLVER_IP
from interceptor.datapath.loader import open_maps
from interceptor.datapath.maps import REASONS
from interceptor.ops.state import read_state
from tests.lab.conftest import Node, send_raw, udp_query

SVC1 = "svc1.ns1.svc.cluster.local"
INTERCEPTED = "10.96.1.1"


FLOOD = (
    "import socket, struct, sys\n"
    "name, server, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "qname = b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\\x00'\n"
    "q = struct.pack('!HHHHHH', 7, 0x0100, 1, 0, 0, 0) + qname + b'\\x00\\x01\\x00\\x01'\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for _ in range(n):\n"
    "    s.sendto(q, (server, 53))\n"
)


def flood(node: Node, pod: str, server: str, name: str, count: int) -> None:
    """``count`` queries for ``name`` as fast as one socket sends them, answers unread."""
    r = node.lab.run_in_pod(pod, "/usr/bin/python3", "-c", FLOOD, name, server, str(count))
    assert r.returncode == 0, r.stderr


def counters(node: Node) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(reason -> count, pod name -> its per-pod counters)."""
    maps = open_maps(node.pin_dir)
    try:
        reasons = {
            name: sum(v.value for v in maps["REASONS"].get_percpu(ct.c_uint32(i)))
            for i, name in enumerate(REASONS)
        }
        state = read_state(node.lab.state_dir)
        assert state is not None
        pods: dict[str, dict[str, int]] = {}
        for slot in state.pods:  # one slot per address: a pod's are added up
            rows = maps["POD_STATS"].get_percpu(ct.c_uint32(slot.pod_id))
            mine = pods.setdefault(slot.name, {"queries": 0, "limited": 0, "direct": 0})
            for f in mine:
                mine[f] += sum(getattr(r, f) for r in rows)
        return reasons, pods
    finally:
        for m in maps.values():
            m.close()


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
    assert 2000 - 100 - 50 <= limited < 2000, limited  # the burst (100) and a bit got through
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
    assert pods["client1"]["direct"] >= 100


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

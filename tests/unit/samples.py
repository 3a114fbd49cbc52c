"""Small node states and pod counters for the tests of the inspection layer."""

from __future__ import annotations

from interceptor.ops.counters import PodCounters
from interceptor.ops.state import AgentInfo, NodeState, PodEntry


def state() -> NodeState:
    info = AgentInfo(
        1,
        "node-1",
        "0.1.0",
        0.0,
        "/sys/fs/bpf/x",
        None,
        ("169.254.20.10",),
        ("10.96.0.10",),
        1,
        0x1D5,
    )
    return NodeState(
        info,
        (
            PodEntry(0, "ns1", "client1", "10.244.1.10", 7, "dvh0"),
            PodEntry(1, "ns1", "client1", "fd00:10:244::10", 7, "dvh0"),
            PodEntry(2, "ns1", "client2", "10.244.1.11", 8, "dvh1"),
        ),
    )


def pod(name: str, queries: int, ns: str = "ns1") -> PodCounters:
    return PodCounters(ns, name, ("10.0.0.1",), ("dvh0",), (0,), {"queries": queries})

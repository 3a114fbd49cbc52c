"""A short fuzz through the BPF path (the full run is ``python -m tests.bench.fuzz``): from a
pod to the captured kube-dns address, over UDP and TCP, IPv4 and IPv6, with the agent running,
so the kernel's fast path, the resolver and kube-dns on the paths the programs pass untouched
all answer some of it.  No reply dnspython's strict parser rejects, valid queries among the
fuzz answered right, and the agent still running."""

from __future__ import annotations

import os

import pytest

from devlab.netns import DNS_IP, DNS_IP6
from tests.fuzzing import from_pod
from tests.lab.conftest import Node

PACKETS = int(os.environ.get("FUZZ_PACKETS", "4000"))


@pytest.mark.parametrize(
    ("proto", "host"), [("udp", DNS_IP), ("udp", DNS_IP6), ("tcp", DNS_IP), ("tcp", DNS_IP6)]
)
def test_fuzz_through_the_bpf_path(fresh_node: Node, proto: str, host: str) -> None:
    agent = fresh_node.start_agent("--query-rate=0", "--answer-rate=0")
    n = PACKETS if proto == "udp" else PACKETS // 10
    r = from_pod(fresh_node.lab, "client1", proto, host, n, 7, 2000, agent.proc.pid)
    bad = "\n".join(f"{q.hex()} -> {a.hex()}: {why}" for q, a, why in r.rejected[:5])
    assert r.replies > n // 4, (r.sent, r.replies)  # most mutations are still answerable
    assert r.rejected == [], bad
    assert r.probe_failures == [], r.probe_failures
    assert agent.proc.poll() is None

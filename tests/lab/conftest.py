"""Fixtures for the root tier: a node built from network namespaces, real BPF, real dnsmasq."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devlab.netns import Agent, Lab, PodSpec, sh, stop
from interceptor.datapath.bpfsys import PinnedMap
from interceptor.datapath.loader import open_maps
from tests.helpers import DATA

UPSTREAM_RECORDS = (
    "--host-record=www.upstream.test,192.0.2.53",
    "--host-record=svc1.ns1.svc.cluster.local,10.96.99.99",  # kube-dns's (different) answer
    "--host-record=auto.mesh.test,192.0.2.77",
    # Cacheable names (dnsmasq's own records have TTL 0): two TTL fields through the CNAME.
    "--host-record=cached.upstream.test,192.0.2.60,2001:db8::60,300",
    "--cname=alias.upstream.test,cached.upstream.test,300",
    "--host-record=brief.upstream.test,192.0.2.61,8",
    "--host-record=other.upstream.test,192.0.2.62,300",
    "--host-record=short.upstream.test,192.0.2.63,2001:db8::63,5",
    # What the upstream says of a mesh host exported to some namespaces only: the answer
    # every other namespace must get (issue 15).
    "--host-record=private.mesh.test,192.0.2.99,300",
)
PODS = [
    PodSpec("client1", "10.244.1.10", "ns1", ip6="fd00:10:244::10"),
    PodSpec("client2", "10.244.1.11", "ns1"),
    PodSpec("stranger", "10.244.1.12", "ns1"),  # not in the service map at all
    PodSpec("optout", "10.244.1.13", "ns1"),
    PodSpec("hushed", "10.244.1.14", "quiet"),
]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the datapath tier needs root (network namespaces, BPF)")


class Node:
    """A lab node with its upstream and (optionally) a running agent."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.upstream_log = tmp / "upstream.log"
        self.source = tmp / "cluster.yaml"
        shutil.copy(DATA / "node.yaml", self.source)
        self.pin_dir = Path(f"/sys/fs/bpf/{lab.prefix}")
        self.agent: Agent | None = None

    def start_agent(self, *extra: str) -> Agent:
        # The tiers below test what the API (here: the YAML file) decides, so early capture
        # (pods the kernel routes before the API reports them) is off unless a test asks.
        if not any(a.startswith("--early-capture") for a in extra):
            extra = ("--early-capture=0", *extra)
        self.agent = self.lab.start_agent(self.source, *extra, pin_dir=self.pin_dir)
        return self.agent

    @contextmanager
    def pinned_maps(self) -> Iterator[dict[str, PinnedMap]]:  # type: ignore[type-arg]
        """Every pinned map of the node's programs, open for as long as the block runs."""
        maps = open_maps(self.pin_dir)
        try:
            yield maps
        finally:
            for m in maps.values():
                m.close()

    def agent_pid(self) -> int:
        """The agent process's own PID (the lab may start it under nsenter)."""
        assert self.agent is not None
        launcher = self.agent.proc.pid
        kids = sh("pgrep", "-P", str(launcher), check=False).stdout.split()
        return int(kids[0]) if kids else launcher

    def stop_agent(self) -> int | None:
        if self.agent is None:
            return None
        rc = stop(self.agent.proc)
        if rc != 0:  # the log says which stop step hung
            print("\n".join(self.agent.log[-40:]), file=sys.stderr)
        self.agent = None
        return rc

    def dig(self, pod: str, *args: str) -> str:
        r = self.lab.run_in_pod(pod, "dig", "+time=2", "+tries=1", *args)
        return r.stdout

    def answer(self, pod: str, *args: str) -> list[str]:
        r = self.lab.run_in_pod(pod, "dig", "+short", "+time=2", "+tries=1", *args)
        return [ln for ln in r.stdout.splitlines() if ln and not ln.startswith(";")]

    def upstream_queries(self, name: str) -> list[str]:
        try:
            text = self.upstream_log.read_text()
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if f"] {name} from" in ln]


def make_node(mode: str, tmp: Path) -> Iterator[Node]:
    need_root()
    lab = Lab(f"dt{uuid.uuid4().hex[:5]}", list(PODS), mode=mode).up()
    node = Node(lab, tmp)
    try:
        lab.start_upstream(*UPSTREAM_RECORDS, log=node.upstream_log)
        yield node
    finally:
        node.stop_agent()
        lab.down()
        shutil.rmtree(node.pin_dir, ignore_errors=True)


@pytest.fixture(params=["ptp", "bridge"], scope="module")
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """A node with a running agent, in both CNI styles; shared by a module's read-only tests."""
    for n in make_node(request.param, tmp_path_factory.mktemp(request.param)):
        n.start_agent()
        yield n


@pytest.fixture
def fresh_node(tmp_path: Path) -> Iterator[Node]:
    """A node without an agent yet, for tests that kill, restart or reconfigure it."""
    yield from make_node("ptp", tmp_path)


RAW_IPV4 = (
    "import socket, struct, sys\n"
    "src, dst, l4 = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])\n"
    "ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(l4), 1, 0, 64, 17, 0,\n"
    "    socket.inet_aton(src), socket.inet_aton(dst))\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
    "s.sendto(ip + l4, (dst, 0))\n"
)


def dns_query(name: str, qid: int = 0x4242) -> bytes:
    """A DNS query for ``name`` A (RD set, no EDNS)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0\1\0\1"


def udp_query(name: str, sport: int = 40000) -> bytes:
    """A UDP header and a DNS query for ``name`` A, as a raw packet carries them."""
    q = dns_query(name)
    return struct.pack("!HHHH", sport, 53, 8 + len(q), 0) + q


def send_raw(node: Node, pod: str, src: str, dst: str, l4: bytes) -> None:
    """One IPv4/UDP packet from ``pod`` with any source address (a raw socket: no checks)."""
    r = node.lab.run_in_pod(pod, "/usr/bin/python3", "-c", RAW_IPV4, src, dst, l4.hex())
    assert r.returncode == 0, r.stderr

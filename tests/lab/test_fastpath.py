"""The in-kernel fast path (bpf/lib/fastpath.h): its answers are byte for byte what the
userspace resolver sends for the same question, they come back from the server the pod asked
with correct checksums, and the answer map follows the service map.  Root only."""

from __future__ import annotations

import ctypes as ct
import json
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interceptor.datapath.maps import FASTPATH_RESULTS
from interceptor.dns import wire
from interceptor.dns.message import parse_query
from tests.helpers import ROOT
from tests.lab.conftest import Node, make_node

EXTRA = """
- apiVersion: v1
  kind: Service
  metadata: {name: dual, namespace: ns1}
  spec: {clusterIPs: [10.96.2.2, "fd00:96::2:2"], ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: ns1}
  spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: db-x, namespace: ns1, labels: {kubernetes.io/service-name: db}}
  addressType: IPv4
  ports: [{name: pg, port: 5432, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.9.1], hostname: db-0, conditions: {ready: true}}
  - {addresses: [10.244.9.2], hostname: db-1, conditions: {ready: true}}
  - {addresses: [10.244.9.3], conditions: {ready: true}}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: pinned, namespace: ns1, creationTimestamp: "2024-01-02T00:00:00Z"}
  spec: {hosts: [api.partner.test], addresses: [192.0.2.200], resolution: STATIC}
"""

NAMES = [
    "svc1.ns1.svc.cluster.local",
    "dual.ns1.svc.cluster.local",
    "db.ns1.svc.cluster.local",
    "db-0.db.ns1.svc.cluster.local",
    "10-244-9-3.db.ns1.svc.cluster.local",
    "auto.mesh.test",
    "api.partner.test",
]
SERVER = "10.96.0.10"
RESOLVER = "169.254.20.10"


def query(
    name: str,
    qtype: int,
    *,
    qid: int,
    rd: bool = True,
    cd: bool = False,
    edns: int | None = None,
    do: bool = False,
    cookie: bool = False,
) -> bytes:
    flags = (0x0100 if rd else 0) | (0x0010 if cd else 0)
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    msg = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    msg += labels + struct.pack("!HH", qtype, 1)
    if edns:
        opts = struct.pack("!HH", 10, 8) + bytes(range(8)) if cookie else b""
        msg += b"\0" + struct.pack("!HHBBHH", 41, edns, 0, 0, 0x8000 if do else 0, len(opts))
        msg += opts
    return msg


def mixed_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def probe(node: Node, pod: str, server: str, queries: list[bytes]) -> list[dict[str, object]]:
    netns = node.lab.pod_ns(pod) if pod else node.lab.node
    r = subprocess.run(
        ["ip", "netns", "exec", netns, str(ROOT / ".venv/bin/python"), "-m"]
        + ["tests.lab.dnsprobe", server],
        input=json.dumps([q.hex() for q in queries]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def fp_stats(node: Node) -> dict[str, int]:
    with node.pinned_maps() as maps:
        stats = maps["FP_STATS"]
        return {
            name: sum(v.value for v in stats.get_percpu(ct.c_uint32(i)))
            for i, name in enumerate(FASTPATH_RESULTS)
        }


@pytest.fixture(scope="module")
def fnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    for n in make_node("ptp", tmp_path_factory.mktemp("fastpath")):
        with n.source.open("a") as f:
            f.write(EXTRA)
        n.start_agent()
        yield n


def variants(names: list[str], rng: random.Random) -> list[bytes]:
    """A and AAAA for each name, four ways: as given, then in mixed case with RD off, with
    CD, and with EDNS 512 / 1232 / 4096 (the last with a cookie option)."""
    return [
        query(
            mixed_case(name, rng) if variant else name,
            qtype,
            qid=rng.randrange(65536),
            rd=variant != 1,
            cd=variant == 2,
            edns=(None, 512, 1232, 4096)[variant],
            cookie=variant == 3,
        )
        for name in names
        for qtype in (wire.A, wire.AAAA)
        for variant in range(4)
    ]


def test_kernel_answers_equal_resolver_answers_byte_for_byte(fnode: Node) -> None:
    queries = variants(NAMES, random.Random(7))
    before = fp_stats(fnode)
    from_pod = probe(fnode, "client1", SERVER, queries)
    after = fp_stats(fnode)
    # The same bytes straight to the resolver on the node's lo: no BPF on that path.
    from_resolver = probe(fnode, "", RESOLVER, queries)
    assert after["hit"] - before["hit"] == len(queries), (before, after)
    for q, k, u in zip(queries, from_pod, from_resolver, strict=True):
        assert k["reply"] is not None and u["reply"] is not None
        assert k["reply"] == u["reply"], parse_query(q).qname
        assert k["csum_ok"], f"bad checksum on the kernel's answer to {parse_query(q).qname}"


def test_ipv6_transport_is_answered_in_the_kernel(fnode: Node) -> None:
    qs = [query("svc1.ns1.svc.cluster.local", t, qid=77 + t) for t in (wire.A, wire.AAAA)]
    before = fp_stats(fnode)
    from_pod = probe(fnode, "client1", "fd00:96::a", qs)
    assert fp_stats(fnode)["hit"] - before["hit"] == 2
    from_resolver = probe(fnode, "", RESOLVER, qs)
    assert [r["reply"] for r in from_pod] == [r["reply"] for r in from_resolver]
    assert all(r["csum_ok"] for r in from_pod)


def test_unusual_queries_fall_through_to_the_resolver(fnode: Node) -> None:
    svc = "svc1.ns1.svc.cluster.local"
    cases = {
        "DO bit": query(svc, wire.A, qid=1, edns=1232, do=True),
        "other type": query(svc, wire.SRV, qid=2),
        "unknown name": query("nothere.ns1.svc.cluster.local", wire.A, qid=3),
        "external name": query("www.upstream.test", wire.A, qid=4),
        "header without its question": query(svc, wire.A, qid=5)[:12],
    }
    before = fp_stats(fnode)
    replies = probe(fnode, "client1", SERVER, list(cases.values()))
    after = fp_stats(fnode)
    assert after["hit"] == before["hit"], "none of these may be answered in the kernel"
    assert after["miss"] + after["fallthrough"] - before["miss"] - before["fallthrough"] >= 4
    # ... and the resolver still answers each of them, from the server the pod asked.
    for (what, _), r in zip(cases.items(), replies, strict=True):
        assert r["reply"] is not None, what


def test_answer_map_follows_the_service_map(fnode: Node) -> None:
    name = "late.ns1.svc.cluster.local"
    q = [query(name, wire.A, qid=9)]
    with fnode.source.open("a") as f:
        f.write(
            "- {apiVersion: v1, kind: Service, metadata: {name: late, namespace: ns1},"
            " spec: {clusterIP: 10.96.3.3, ports: [{name: http, port: 80}]}}\n"
        )
    deadline = time.monotonic() + 5
    while True:
        before = fp_stats(fnode)["hit"]
        reply = probe(fnode, "client2", SERVER, q)[0]["reply"]
        if fp_stats(fnode)["hit"] == before + 1:
            break
        assert time.monotonic() < deadline, "the new service never reached the kernel"
        time.sleep(0.2)
    assert isinstance(reply, str) and bytes([10, 96, 3, 3]).hex() in reply
    text = fnode.source.read_text()
    fnode.source.write_text(
        text[: text.index("- {apiVersion: v1, kind: Service, metadata: {name: late")]
    )
    deadline = time.monotonic() + 5
    while True:
        r = probe(fnode, "client2", SERVER, q)[0]["reply"]
        assert isinstance(r, str)
        if struct.unpack("!H", bytes.fromhex(r)[2:4])[0] & 0xF == wire.NXDOMAIN:
            break
        assert time.monotonic() < deadline, "the deleted service is still answered"
        time.sleep(0.2)


def test_no_fastpath_flag_leaves_every_query_to_the_resolver(tmp_path: Path) -> None:
    for node in make_node("ptp", tmp_path):
        node.start_agent("--no-fastpath")
        assert not (node.pin_dir / "FP_ANSWERS").exists()
        out = node.dig("client1", "svc1.ns1.svc.cluster.local")
        assert "10.96.1.1" in out and "SERVER: 10.96.0.10#53" in out

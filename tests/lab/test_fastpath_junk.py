"""Search-path junk answered in the kernel (``--no-autopath``): an A or AAAA question below
the cluster zone, not below pod.<zone>, for a name that exists in neither FP_ANSWERS nor
FP_OWNERS gets the resolver's NXDOMAIN byte for byte, without waking the resolver;
everything that is not exactly that is left to the resolver.  Root only."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator

import pytest

from interceptor.dns import wire
from interceptor.ops.counters import CounterReader
from tests.lab.conftest import Node, make_node
from tests.lab.test_fastpath import RESOLVER, SERVER, fp_stats, probe, query, variants

JUNK = [
    "www.example.com.ns1.svc.cluster.local",  # ndots:5 expansion in namespace ns1
    "www.example.com.svc.cluster.local",  # ... the second search domain
    "www.example.com.cluster.local",  # ... and the third
    "nothere.ns1.svc.cluster.local",
    "a.b.c.d.nothere.svc.cluster.local",
]


def redirected(node: Node) -> int:
    with CounterReader(node.pin_dir, lambda: None) as reader:
        return reader.read().counters["REASONS"]["redirected"]


def rcode(reply: object) -> int:
    assert isinstance(reply, str)
    return struct.unpack("!H", bytes.fromhex(reply)[2:4])[0] & 0xF


@pytest.fixture(scope="module")
def jnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    for n in make_node("ptp", tmp_path_factory.mktemp("junk")):
        n.start_agent("--no-autopath")
        yield n


def test_junk_is_answered_in_the_kernel_as_the_resolver_answers_it(jnode: Node) -> None:
    queries = variants(JUNK, random.Random(11))
    before, woke = fp_stats(jnode), redirected(jnode)
    from_pod = probe(jnode, "client1", SERVER, queries)
    after = fp_stats(jnode)
    assert after["nxdomain"] - before["nxdomain"] == len(queries), (before, after)
    assert after["hit"] - before["hit"] == len(queries)
    assert redirected(jnode) == woke, "a junk query reached the resolver"
    from_resolver = probe(jnode, "", RESOLVER, queries)  # no BPF on the node's own lo
    for k, u in zip(from_pod, from_resolver, strict=True):
        assert k["reply"] is not None and k["reply"] == u["reply"]
        assert rcode(k["reply"]) == wire.NXDOMAIN and k["csum_ok"]


def test_what_is_not_exactly_junk_is_left_to_the_resolver(jnode: Node) -> None:
    cases = {
        "an empty non-terminal": query("ns1.svc.cluster.local", wire.A, qid=1),
        "the suffix itself": query("svc.cluster.local", wire.A, qid=2),
        "a name with records, not of this type": query(
            "_http._tcp.svc1.ns1.svc.cluster.local", wire.A, qid=3
        ),
        "another type": query("nothere.ns1.svc.cluster.local", wire.TXT, qid=4),
        "pod records stay in userspace": query("1-2-3-4.ns1.pod.cluster.local", wire.A, qid=5),
        "anything below pod.<zone>": query("nothere.pod.cluster.local", wire.A, qid=6),
        "the zone's apex": query("cluster.local", wire.A, qid=11),
        "DO bit": query("nothere.ns1.svc.cluster.local", wire.A, qid=7, edns=1232, do=True),
    }
    # Ends in the zone's bytes, but its labels are "ab\x07cluster" and "local": not below
    # the zone at all, so the resolver forwards it.
    fake = b"\x0aab\x07cluster\x05local\x00"
    cases["a suffix that is not on a label boundary"] = (
        struct.pack("!HHHHHH", 8, 0x0100, 1, 0, 0, 0) + fake + struct.pack("!HH", wire.A, 1)
    )
    before, woke = fp_stats(jnode), redirected(jnode)
    replies = probe(jnode, "client1", SERVER, list(cases.values()))
    assert fp_stats(jnode)["nxdomain"] == before["nxdomain"], "answered as junk in the kernel"
    assert redirected(jnode) - woke == len(cases)
    for (what, _), r in zip(cases.items(), replies, strict=True):
        assert r["reply"] is not None, what


def test_the_name_set_follows_the_service_map(jnode: Node) -> None:
    name = "came.ns1.svc.cluster.local"
    child = "_http._tcp.came.ns1.svc.cluster.local"  # its SRV owner: exists, no A
    q = [query(name, wire.A, qid=9), query(child, wire.A, qid=10)]
    replies = probe(jnode, "client2", SERVER, q)
    assert [rcode(r["reply"]) for r in replies] == [wire.NXDOMAIN, wire.NXDOMAIN]
    entry = (
        "- {apiVersion: v1, kind: Service, metadata: {name: came, namespace: ns1},"
        " spec: {clusterIP: 10.96.4.4, ports: [{name: http, port: 80}]}}\n"
    )
    with jnode.source.open("a") as f:
        f.write(entry)
    deadline = time.monotonic() + 5
    while True:
        replies = probe(jnode, "client2", SERVER, q)
        if [rcode(r["reply"]) for r in replies] == [wire.NOERROR, wire.NOERROR]:
            break  # the A from the answer map, NODATA for the SRV owner from the resolver
        assert time.monotonic() < deadline, f"still junk: {replies}"
        time.sleep(0.2)
    text = jnode.source.read_text()
    jnode.source.write_text(text.replace(entry, ""))
    deadline = time.monotonic() + 5
    while True:
        before = fp_stats(jnode)["nxdomain"]
        replies = probe(jnode, "client2", SERVER, q)
        if fp_stats(jnode)["nxdomain"] - before == 2:
            break  # junk again, in the kernel
        assert time.monotonic() < deadline, f"not junk again: {replies}"
        time.sleep(0.2)

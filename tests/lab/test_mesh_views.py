"""ServiceEntry exportTo on the BPF path (issue 15): pods of two namespaces ask the same mesh
hosts through their veths, and each gets what its namespace sees, from the kernel where it
sees an address and from the resolver otherwise, byte for byte the same either way; a name
forwarded for one namespace never reaches the kernel's cache of forwarded names.  Root only.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interceptor.dns import wire
from tests.lab.conftest import Node, make_node
from tests.lab.test_fastpath import SERVER, fp_stats, probe, query, variants
from tests.lab.test_inspect import cli, cli_json

ENTRIES = """
- {apiVersion: v1, kind: Namespace, metadata: {name: ns2}}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: private, namespace: ns1, creationTimestamp: "2025-01-01T00:00:00Z"}
  spec: {hosts: [private.mesh.test], addresses: [192.0.2.201], resolution: STATIC,
         exportTo: ["."]}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: shared, namespace: ns1, creationTimestamp: "2025-01-01T00:00:00Z"}
  spec: {hosts: [shared.mesh.test], addresses: [192.0.2.210], resolution: STATIC}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: shared-own, namespace: ns2, creationTimestamp: "2025-02-01T00:00:00Z"}
  spec: {hosts: [shared.mesh.test], addresses: [192.0.2.211], resolution: STATIC,
         exportTo: ["."]}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: for-ns2, namespace: ns1, creationTimestamp: "2025-01-01T00:00:00Z"}
  spec: {hosts: [vip.mesh.test], resolution: DNS, exportTo: [ns2]}
"""

# What each pod must get: its namespace's entry, else the upstream's answer.
EXPECTED = {
    ("client1", "private.mesh.test"): ("192.0.2.201", True),
    ("client2", "private.mesh.test"): ("192.0.2.99", False),  # the upstream's
    ("client1", "shared.mesh.test"): ("192.0.2.210", True),
    ("client2", "shared.mesh.test"): ("192.0.2.211", True),  # its own entry first
    ("client1", "vip.mesh.test"): (None, False),  # the upstream's error (it has no record)
    ("client2", "vip.mesh.test"): ("240.240.", True),
}
NAMES = ["private.mesh.test", "shared.mesh.test", "vip.mesh.test"]


@pytest.fixture(scope="module")
def vnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    for n in make_node("ptp", tmp_path_factory.mktemp("views")):
        text = n.source.read_text()
        # client2 lives in namespace ns2 here (the lab's pods are named by the file).
        text = text.replace(
            "metadata: {name: client2, namespace: ns1}", "metadata: {name: client2, namespace: ns2}"
        )
        n.source.write_text(text + ENTRIES)
        n.start_agent()
        yield n


def addresses(reply_hex: object) -> tuple[int, list[str]]:
    assert isinstance(reply_hex, str)
    msg = bytes.fromhex(reply_hex)
    rcode = msg[3] & 0xF
    out = []
    i = msg.find(b"\xc0\x0c")
    while i >= 0 and i + 16 <= len(msg):
        if msg[i + 2 : i + 4] == b"\x00\x01" and msg[i + 10 : i + 12] == b"\x00\x04":
            out.append(".".join(str(b) for b in msg[i + 12 : i + 16]))
        i = msg.find(b"\xc0\x0c", i + 2)
    return rcode, out


def question(q: bytes) -> tuple[str, int]:
    name, end = wire.decode_name_plain(q, 12)
    return name.lower(), int.from_bytes(q[end : end + 2], "big")


def drop_view_entries(node: Node) -> int:
    with node.pinned_maps() as maps:
        answers = maps["FP_ANSWERS"]
        keys = [k for k in answers.keys() if k.view != 0]
        for k in keys:
            answers.delete(k)
        return len(keys)


def test_each_namespace_gets_its_own_answer_from_the_kernel_and_the_resolver_alike(
    vnode: Node,
) -> None:
    rng = random.Random(15)
    for pod in ("client1", "client2"):
        mine = [n for n in NAMES if EXPECTED[(pod, n)][1]]
        queries = variants(mine, rng)
        deadline = time.monotonic() + 10
        while True:  # the views' entries are written after the pods' PODS entries
            before = fp_stats(vnode)
            from_kernel = probe(vnode, pod, SERVER, queries)
            hits = fp_stats(vnode)["hit"] - before["hit"]
            if hits == len(queries):
                break
            assert time.monotonic() < deadline, f"{pod}: {hits} of {len(queries)} in the kernel"
            time.sleep(0.3)
        for q, r in zip(queries, from_kernel, strict=True):
            assert r["csum_ok"]
            name, qtype = question(q)
            rcode, got = addresses(r["reply"])
            want = EXPECTED[(pod, name)][0]
            if qtype == wire.A:
                assert rcode == 0 and len(got) == 1 and want is not None
                assert got[0].startswith(want), (pod, name, got)
    # The same questions with the kernel's view entries gone: the resolver answers each pod,
    # deciding by its namespace, with the same bytes.
    kernel: dict[str, list[object]] = {}
    for pod in ("client1", "client2"):
        qs = variants(NAMES, random.Random(pod))
        kernel[pod] = [r["reply"] for r in probe(vnode, pod, SERVER, qs)]
    assert drop_view_entries(vnode) > 0
    for pod in ("client1", "client2"):
        qs = variants(NAMES, random.Random(pod))
        before = fp_stats(vnode)["hit"]
        resolver = [r["reply"] for r in probe(vnode, pod, SERVER, qs)]
        assert fp_stats(vnode)["hit"] == before, "the kernel answered without its views"
        for q, k, u in zip(qs, kernel[pod], resolver, strict=True):
            name, qtype = question(q)
            want, seen = EXPECTED[(pod, name)]
            if seen:
                assert k == u, f"{pod} {name}: kernel {k} resolver {u}"
            rcode, got = addresses(u)
            if qtype != wire.A:
                continue  # AAAA: NODATA for mesh hosts without IPv6, the upstream's else
            if want is None:
                assert rcode != wire.NOERROR and not got, (pod, name, u)  # the upstream's
            else:
                assert rcode == 0 and len(got) == 1 and got[0].startswith(want), (pod, name, got)


def test_a_name_forwarded_for_one_namespace_never_enters_the_kernels_cache(vnode: Node) -> None:
    """client2 (ns2) makes private.mesh.test hot in the cache (forwarded: it does not see
    the entry); the kernel must not learn it, or client1 (ns1) would get the upstream's
    answer from the kernel instead of the VIP."""
    q = [query("private.mesh.test", wire.A, qid=100 + i) for i in range(12)]
    for r in probe(vnode, "client2", SERVER, q):
        assert addresses(r["reply"])[1] == ["192.0.2.99"]
    time.sleep(1.0)  # several turns of the kernel cache's mirror (0.25 s)
    with vnode.pinned_maps() as maps:
        names = [bytes(k.name).rstrip(b"\0") for k in maps["FP_CACHE"].keys()]
    assert wire.encode_name("private.mesh.test").rstrip(b"\0") not in names
    for r in probe(vnode, "client1", SERVER, q[:3]):
        assert addresses(r["reply"])[1] == ["192.0.2.201"]


def test_query_from_a_pod_says_why_it_sees_what_it_sees(vnode: Node) -> None:
    q = cli_json(vnode, "query", "private.mesh.test", "--from", "10.244.1.11")
    why = q["explanation"]["visibility"]
    assert why[0] == "10.244.1.11 is a pod in namespace ns2"
    assert "ServiceEntry ns1/private" in why[1] and "does not see it" in why[1]
    assert "forwarded" in why[-1]
    q = cli_json(vnode, "query", "private.mesh.test", "--from", "10.244.1.10")
    assert q["explanation"]["rule"] == "mesh-scoped"
    assert q["explanation"]["visibility"][-1].startswith("so it is answered 192.0.2.201")
    text = cli(vnode, "query", "private.mesh.test", "--from", "10.244.1.11").stdout
    assert "visible: 10.244.1.11 is a pod in namespace ns2" in text


def test_a_restarted_agent_numbers_namespaces_anew_without_old_views(tmp_path: Path) -> None:
    """Views are the agent's own numbering.  The pins outlive an agent, so the next one must
    clear the old views before its pods carry the new numbers: here client1 moves from ns1
    to ns0 between the two runs, so ns0 gets the number ns1 had, and ns1's private entry must
    not reach client1 through the old entries."""
    for node in make_node("ptp", tmp_path):
        text = node.source.read_text().replace(
            "metadata: {name: client2, namespace: ns1}", "metadata: {name: client2, namespace: ns2}"
        )
        node.source.write_text(text + ENTRIES)
        node.start_agent()
        wait_for_kernel(node, "client1", ["private.mesh.test"])  # ns1 sees it, as view 1
        with node.pinned_maps() as maps:
            assert any(k.view == 1 for k in maps["FP_ANSWERS"].keys())
        node.stop_agent()  # the pins stay (no DaemonSet: detach)
        # client1 moves to namespace ns0, numbered first: view 1, ns1's number before.
        node.source.write_text(
            node.source.read_text().replace(
                "metadata: {name: client1, namespace: ns1}",
                "metadata: {name: client1, namespace: ns0}",
            )
        )
        node.start_agent()
        wait_for_kernel(node, "client2", ["shared.mesh.test"])
        for pod in ("client1", "client2"):
            for r in probe(node, pod, SERVER, [query("private.mesh.test", wire.A, qid=5)]):
                assert addresses(r["reply"])[1] == ["192.0.2.99"], pod


def wait_for_kernel(node: Node, pod: str, names: list[str]) -> None:
    queries = [query(n, wire.A, qid=i) for i, n in enumerate(names)]
    deadline = time.monotonic() + 10
    while True:
        before = fp_stats(node)["hit"]
        probe(node, pod, SERVER, queries)
        if fp_stats(node)["hit"] - before == len(queries):
            return
        assert time.monotonic() < deadline, f"{pod}: {names} not answered in the kernel"
        time.sleep(0.3)

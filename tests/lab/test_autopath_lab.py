"""Autopath from a pod whose search list is known, end to end: the netns node with the agent
and its BPF capture, a real dnsmasq upstream, and glibc's own stub resolver in the pod
(``getent``, ``ndots:5``, the kube-style search line plus a node search domain).  What the
pod sent is counted by the resolver's request metric; what reached the upstream, by the
upstream's query log.  Root only."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devlab.netns import DNS_IP, Lab, PodSpec, sh
from tests.lab.conftest import Node, need_root

METRICS_PORT = 19253  # inside the lab's node namespace: nothing else listens there
NODE_SEARCH = "corp.test"
UPSTREAM_RECORDS = (
    "--local=/example.test/",  # unknown names there: NXDOMAIN (not REFUSED)
    f"--local=/{NODE_SEARCH}/",
    "--host-record=ext.example.test,192.0.2.80,2001:db8::80",
    "--host-record=v4.example.test,192.0.2.81",
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    need_root()
    tmp = tmp_path_factory.mktemp("autopath")
    lab = Lab(f"ap{uuid.uuid4().hex[:5]}", [PodSpec("client1", "10.244.1.10", "ns1")]).up()
    n = Node(lab, tmp)
    try:
        lab.start_upstream(*UPSTREAM_RECORDS, log=n.upstream_log)
        # kubelet appends the node's search domains to a ClusterFirst pod's search line; the
        # agent reads the same ones from the node's resolv.conf.
        pod_resolv = Path("/etc/netns") / lab.pod_ns("client1") / "resolv.conf"
        pod_resolv.write_text(
            pod_resolv.read_text().replace("cluster.local\n", f"cluster.local {NODE_SEARCH}\n")
        )
        node_resolv = tmp / "resolv.conf"
        node_resolv.write_text(f"nameserver {DNS_IP}\nsearch {NODE_SEARCH}\n")
        n.start_agent(
            "--resolv-conf",
            str(node_resolv),
            "--metrics-address",
            f"127.0.0.1:{METRICS_PORT}",
            # Every pod query then reaches the resolver, whose request metric counts them
            # all (the kernel would answer svc1's A itself, uncounted there).
            "--no-fastpath",
        )
        yield n
    finally:
        n.stop_agent()
        lab.down()
        shutil.rmtree(n.pin_dir, ignore_errors=True)


def metrics(node: Node) -> dict[str, float]:
    """Sample name with labels -> value, scraped inside the node namespace."""
    script = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics').read().decode())"
    )
    out = sh("/usr/bin/python3", "-c", script, netns=node.lab.node).stdout
    samples = {}
    for line in out.splitlines():
        m = re.match(r"^(interceptor_\S+?) (\S+)$", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def requests(samples: dict[str, float], rcode: str = "", source: str = "") -> float:
    """interceptor_requests_total summed over every series (of this rcode and source)."""
    wanted = [f'rcode="{rcode}"'] if rcode else []
    wanted += [f'source="{source}"'] if source else []
    return sum(
        v
        for k, v in samples.items()
        if k.startswith("interceptor_requests_total{") and all(w in k for w in wanted)
    )


def autopath(samples: dict[str, float], result: str) -> float:
    return samples.get(f'interceptor_autopath_total{{result="{result}"}}', 0.0)


def getent(node: Node, *args: str) -> tuple[int, str, float, dict[str, float]]:
    """(exit code, output, queries the resolver answered meanwhile, metrics after)."""
    before = metrics(node)
    r = node.lab.run_in_pod("client1", "getent", *args, timeout=30)
    after = metrics(node)
    return r.returncode, r.stdout, requests(after) - requests(before), after


def test_external_name_takes_one_query(node: Node) -> None:
    hits = autopath(metrics(node), "hit")
    rc, out, asked, after = getent(node, "hosts", "ext.example.test")
    # gethostbyname2(AF_INET6): one AAAA query for the first expansion, answered with a
    # CNAME to the bare name and its address.
    assert rc == 0 and out.split()[0] == "2001:db8::80", out
    assert asked == 1
    assert autopath(after, "hit") == hits + 1
    # The cluster candidates never left the node; the node search domain and the bare name
    # were asked by the resolver (from the node), not by the pod.
    for cluster in ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"):
        assert node.upstream_queries(f"ext.example.test.{cluster}") == []
    assert node.upstream_queries(f"ext.example.test.{NODE_SEARCH}")
    froms = {ln.rsplit(" ", 1)[-1] for ln in node.upstream_queries("ext.example.test")}
    assert froms == {"10.200.0.1"}


def test_getaddrinfo_of_a_v4_only_name_takes_one_query_per_family(node: Node) -> None:
    # A and AAAA in parallel: A gets CNAME + A, AAAA gets CNAME + NODATA (nothing later in
    # the search list exists), so glibc's search ends at once for both.
    rc, out, asked, _ = getent(node, "ahosts", "v4.example.test")
    assert rc == 0 and out.split()[0] == "192.0.2.81", out
    assert asked == 2


def test_namespace_qualified_short_name(node: Node) -> None:
    rc, out, asked, _ = getent(node, "ahostsv4", "svc1.ns1")
    assert rc == 0 and out.split()[0] == "10.96.1.1", out
    assert asked == 1


def test_nonexistent_name_still_ends_nxdomain_after_the_client_search(node: Node) -> None:
    before = metrics(node)
    rc, out, asked, after = getent(node, "hosts", "nope.example.test")
    assert rc == 2 and out == ""  # not found
    assert autopath(after, "miss") >= autopath(before, "miss") + 1
    # The first expansion got NXDOMAIN and glibc searched on by itself, down to the bare
    # name (answered from the cache the autopath walk filled): five queries per family.
    assert asked == 10
    cached_nx = requests(after, "NXDOMAIN", "cache") - requests(before, "NXDOMAIN", "cache")
    assert cached_nx >= 2  # the pod's own queries for the node-domain and bare candidates

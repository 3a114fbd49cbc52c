"""The BPF datapath and the node agent, end to end: real tc programs on real veths, a real
glibc stub resolver and dig in the pods, a real dnsmasq as kube-dns.  Root only."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from devlab.netns import PodSpec, sh
from interceptor.ops.counters import CounterReader
from interceptor.ops.state import read_state
from tests.lab.conftest import Node, dns_query, send_raw, udp_query

INTERCEPTED = "10.96.1.1"  # the interceptor's answer for svc1
DIRECT = "10.96.99.99"  # kube-dns's answer for svc1: the query bypassed us
SVC1 = "svc1.ns1.svc.cluster.local"


def reasons(node: Node) -> dict[str, int]:
    with CounterReader(node.pin_dir, lambda: None) as reader:
        return reader.read().counters["REASONS"]


def test_udp_and_tcp_answered_by_interceptor_from_the_asked_server(node: Node) -> None:
    out = node.dig("client1", SVC1)
    assert f"{INTERCEPTED}" in out and "SERVER: 10.96.0.10#53" in out
    out = node.dig("client1", "+tcp", SVC1)
    assert f"{INTERCEPTED}" in out and "(TCP)" in out
    assert node.answer("client1", "auto.mesh.test")[0].startswith("240.240.")  # mesh VIP


@pytest.mark.parametrize("node", ["ptp"], indirect=True)  # the bridge lab is IPv4-only
def test_ipv6_udp_and_tcp(node: Node) -> None:
    out = node.dig("client1", "@fd00:96::a", SVC1)
    assert INTERCEPTED in out and "SERVER: fd00:96::a#53" in out
    out = node.dig("client1", "@fd00:96::a", "+tcp", SVC1)
    assert INTERCEPTED in out and "(TCP)" in out
    assert node.answer("client1", "@fd00:96::a", "www.upstream.test") == ["192.0.2.53"]


def test_tcp_several_queries_on_one_connection(node: Node) -> None:
    out = node.dig("client2", "+tcp", "+keepopen", SVC1, "auto.mesh.test", "www.upstream.test")
    assert INTERCEPTED in out and "240.240." in out and "192.0.2.53" in out


def test_getent_uses_search_path_through_the_datapath(node: Node) -> None:
    r = node.lab.run_in_pod("client1", "getent", "ahosts", "svc1")
    assert r.returncode == 0 and r.stdout.split()[0] == INTERCEPTED


def test_50_concurrent_getaddrinfo_none_time_out(node: Node) -> None:
    script = (
        "import socket, time, concurrent.futures as cf\n"
        "def one(i):\n"
        "    t = time.monotonic()\n"
        "    ip = socket.getaddrinfo('svc1', 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]\n"
        "    return time.monotonic() - t, ip\n"
        "with cf.ThreadPoolExecutor(50) as ex:\n"
        "    res = list(ex.map(one, range(50)))\n"
        "print(max(t for t, _ in res), sorted({ip for _, ip in res}))\n"
    )
    r = node.lab.run_in_pod("client1", "/usr/bin/python3", "-c", script, timeout=60)
    assert r.returncode == 0, r.stderr
    worst, ips = r.stdout.split(" ", 1)
    assert ips.strip() == f"['{INTERCEPTED}']"
    assert float(worst) < 1.0, f"slowest getaddrinfo took {worst}s: a query was lost"


def test_forwarded_name_reaches_upstream_from_the_resolver(node: Node) -> None:
    assert node.answer("client1", "www.upstream.test") == ["192.0.2.53"]
    froms = [ln.rsplit(" ", 1)[-1] for ln in node.upstream_queries("www.upstream.test")]
    assert "10.200.0.1" in froms  # the node's resolver asked, not the pod
    assert "10.244.1.10" not in froms


def test_no_iptables_or_nftables_rules(node: Node) -> None:
    for cmd in (["iptables-save"], ["ip6tables-save"]):
        out = sh(*cmd, netns=node.lab.node, check=False).stdout
        assert not [ln for ln in out.splitlines() if ln.startswith("-A")], out
    assert sh("nft", "list", "ruleset", netns=node.lab.node).stdout.strip() == ""


def test_pods_not_ours_are_left_alone(node: Node) -> None:
    assert node.answer("stranger", SVC1) == [DIRECT]  # not in the service map
    assert node.answer("optout", SVC1) == [DIRECT]  # annotation opt-out
    assert node.answer("hushed", SVC1) == [DIRECT]  # namespace label opt-out


def test_early_capture_takes_a_pod_the_api_has_not_reported_yet(fresh_node: Node) -> None:
    """A pod's sandbox exists (its veth and route) before the API server knows its address:
    with --early-capture its very first query is answered by the interceptor, and an address
    the API never claims is let go when the window ends.  (ptp: a bridge has no per-pod
    route, so there the API decides alone.)"""
    node = fresh_node
    node.start_agent("--early-capture=4")
    node.lab.add_pod(PodSpec("newborn", "10.244.1.40", "ns1"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and node.answer("newborn", SVC1) != [INTERCEPTED]:
        time.sleep(0.1)
    assert node.answer("newborn", SVC1) == [INTERCEPTED]
    # Never reported by the API (not in the file): released after the window.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and node.answer("newborn", SVC1) != [DIRECT]:
        time.sleep(0.25)
    assert node.answer("newborn", SVC1) == [DIRECT]
    # Pods the API did report and that opt out are never taken, not even early.
    assert node.answer("optout", SVC1) == [DIRECT]
    assert node.answer("hushed", SVC1) == [DIRECT]
    # A second newborn, captured early, then named by the API: the state file (per-pod
    # metrics, `interceptor stats`) says whose veth it is, though nothing was re-attached.
    node.lab.add_pod(PodSpec("named", "10.244.1.41", "ns1"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and node.answer("named", SVC1) != [INTERCEPTED]:
        time.sleep(0.1)
    assert node.answer("named", SVC1) == [INTERCEPTED]
    with node.source.open("a") as f:
        f.write(
            "- {apiVersion: v1, kind: Pod, metadata: {name: named, namespace: ns1},\n"
            "   spec: {nodeName: node-1}, status: {podIPs: [{ip: 10.244.1.41}]}}\n"
        )
    deadline = time.monotonic() + 10
    while not [p for p in read_state(node.lab.state_dir).pods if p.name == "named"]:
        assert time.monotonic() < deadline, "the state file never named the early pod"
        time.sleep(0.2)


def test_spoofed_source_creates_no_state_and_is_not_redirected(node: Node) -> None:
    before = reasons(node)["spoofed"]
    send_raw(node, "client1", "10.244.1.99", "10.96.0.10", udp_query("spoof.test"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and reasons(node)["spoofed"] == before:
        time.sleep(0.05)
    assert reasons(node)["spoofed"] == before + 1
    with node.pinned_maps() as maps:
        pods = {k.pod.text(k.family) for k in maps["FLOWS"].keys()}
    assert "10.244.1.99" not in pods
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not node.upstream_queries("spoof.test"):
        time.sleep(0.05)
    assert node.upstream_queries("spoof.test")[0].endswith("from 10.244.1.99")


def test_truncated_headers_are_counted_as_malformed_and_passed(node: Node) -> None:
    before = reasons(node)["malformed"]
    half_a_udp_header = struct.pack("!HH", 40000, 53)
    send_raw(node, "client1", "10.244.1.10", "10.96.0.10", half_a_udp_header)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and reasons(node)["malformed"] == before:
        time.sleep(0.05)
    assert reasons(node)["malformed"] == before + 1
    assert node.answer("client1", SVC1) == [INTERCEPTED]  # and the pod's DNS goes on


def test_fail_open_after_sigkill_within_a_second(fresh_node: Node) -> None:
    agent = fresh_node.start_agent()
    assert fresh_node.answer("client1", SVC1) == [INTERCEPTED]
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    t0 = time.monotonic()
    while fresh_node.answer("client1", "+time=1", SVC1) != [DIRECT]:
        assert time.monotonic() - t0 < 3, "pod DNS still broken 3 s after SIGKILL"
    assert time.monotonic() - t0 < 1.2
    assert "no_socket" in reasons(fresh_node) and reasons(fresh_node)["no_socket"] >= 1


LONG_LIVED = (
    "import os, socket, sys\n"
    "q = bytes.fromhex(sys.argv[1])\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(1.0)\n"
    "def ask():\n"
    "    s.sendto(q, ('10.96.0.10', 53))\n"
    "    r = s.recv(4096)\n"
    "    return socket.inet_ntoa(r[-4:])\n"
    "print(ask(), flush=True)\n"
    "sys.stdin.readline()\n"  # the agent is killed meanwhile
    "try:\n"
    "    print(ask(), flush=True)\n"
    "except OSError:\n"
    "    print('lost', flush=True)\n"
)


def answers_across_a_sigkill(node: Node, script: str) -> tuple[str, str]:
    """Run ``script`` in client1 with the agent up: it prints its first answer, waits for a
    line on stdin (the agent is SIGKILLed meanwhile), then prints its second."""
    assert node.agent is not None
    client = subprocess.Popen(
        ["ip", "netns", "exec", node.lab.pod_ns("client1"), "/usr/bin/python3", "-c", script,
         dns_query(SVC1).hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    try:
        before = client.stdout.readline().strip()
        node.agent.proc.send_signal(signal.SIGKILL)
        node.agent.proc.wait()
        client.stdin.write("\n")
        client.stdin.flush()
        return before, client.stdout.readline().strip()
    finally:
        client.kill()
        client.wait()


def test_a_long_lived_socket_fails_open_at_the_first_query_after_sigkill(
    fresh_node: Node,
) -> None:
    """A socket that already has its flow (most clients keep one) must not wait for the
    heartbeat to time out: its next query goes to its own server at once."""
    fresh_node.start_agent("--no-fastpath")
    before, after = answers_across_a_sigkill(fresh_node, LONG_LIVED)
    assert before == INTERCEPTED
    assert after == DIRECT  # not lost, not a second late


SAME_PORT = (
    "import socket, struct, sys\n"
    "q = bytes.fromhex(sys.argv[1])\n"
    "def connect():\n"
    "    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    c.bind(('0.0.0.0', 40053))\n"
    "    c.settimeout(2)\n"
    "    c.connect(('10.96.0.10', 53))\n"
    "    return c\n"
    "def ask(c):\n"
    "    c.sendall(struct.pack('!H', len(q)) + q)\n"
    "    r = c.recv(4096)\n"
    "    return socket.inet_ntoa(r[-4:]) if len(r) > 4 else 'closed'\n"
    "c = connect()\n"
    "print(ask(c), flush=True)\n"
    "sys.stdin.readline()\n"  # the agent is killed meanwhile
    "try:\n"
    "    ask(c)\n"
    "except OSError:\n"
    "    pass\n"  # reset by the dead resolver: no TIME_WAIT, the port is free again
    "c.close()\n"
    "try:\n"
    "    print(ask(connect()), flush=True)\n"
    "except OSError as e:\n"
    "    print(type(e).__name__, flush=True)\n"
)


def test_a_connection_on_a_reused_port_after_sigkill_goes_to_its_own_server(
    fresh_node: Node,
) -> None:
    """The port of a connection the killed resolver reset is free at once; a new connection
    from it fails open, and its segments must not follow the old connection's flow."""
    fresh_node.start_agent("--no-fastpath")
    before, after = answers_across_a_sigkill(fresh_node, SAME_PORT)
    assert before == INTERCEPTED
    assert after == DIRECT


def test_sigterm_detaches_cleanly(fresh_node: Node) -> None:
    fresh_node.start_agent()
    node_ns = fresh_node.lab.node
    assert (
        "dnsi_from_pod"
        in sh("tc", "filter", "show", "dev", "dvh0", "ingress", netns=node_ns).stdout
    )
    assert fresh_node.stop_agent() == 0
    assert "dnsi" not in sh("tc", "filter", "show", "dev", "dvh0", "ingress", netns=node_ns).stdout
    assert "dnsi" not in sh("tc", "filter", "show", "dev", "dvh0", "egress", netns=node_ns).stdout
    assert "169.254.20.10" not in sh("ip", "addr", "show", "dev", "lo", netns=node_ns).stdout
    assert "clsact" in sh("tc", "qdisc", "show", "dev", "dvh0", netns=node_ns).stdout  # kept
    assert fresh_node.answer("client1", SVC1) == [DIRECT]


def test_restart_replaces_filters_without_duplicates(fresh_node: Node) -> None:
    agent = fresh_node.start_agent()
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    fresh_node.start_agent()
    node_ns = fresh_node.lab.node
    for hook in ("ingress", "egress"):
        out = sh("tc", "filter", "show", "dev", "dvh0", hook, netns=node_ns).stdout
        assert out.count("handle 0x1d5") == 1, out
    assert fresh_node.answer("client1", SVC1) == [INTERCEPTED]
    # The killed agent left its address; its successor knows (the address book) that it is
    # ours, and takes it away when it stops.
    assert fresh_node.stop_agent() == 0
    assert "169.254.20.10" not in sh("ip", "addr", "show", "dev", "lo", netns=node_ns).stdout


def test_pods_appearing_and_disappearing_are_followed(fresh_node: Node) -> None:
    with fresh_node.source.open("a") as f:
        f.write(
            "- {apiVersion: v1, kind: Pod, metadata: {name: late, namespace: ns1},\n"
            "   spec: {nodeName: node-1}, status: {podIPs: [{ip: 10.244.1.16}]}}\n"
        )
    agent = fresh_node.start_agent()
    fresh_node.lab.add_pod(PodSpec("late", "10.244.1.16", "ns1"))
    deadline = time.monotonic() + 5
    while fresh_node.answer("late", "+time=1", SVC1) != [INTERCEPTED]:
        assert time.monotonic() < deadline, "\n".join(agent.log[-10:])
    fresh_node.lab.remove_pod("late")
    deadline = time.monotonic() + 5
    while not any("detached from dvh5" in ln for ln in agent.log):
        assert time.monotonic() < deadline, "\n".join(agent.log[-10:])
        time.sleep(0.1)


def test_capture_all_never_relays_to_a_server_nobody_allowed(fresh_node: Node) -> None:
    """--capture-all: a pod addressing some other DNS server (a tunnel out, past its
    NetworkPolicy) gets REFUSED from the node, counted; cluster names are still answered,
    and the captured server's forwarding is untouched."""
    port = 19254
    fresh_node.start_agent("--capture-all", "--metrics-address", f"127.0.0.1:{port}")
    elsewhere = "10.96.0.53"  # no server there, and nobody allowed it
    for _ in range(3):  # cached from the captured server: the cache's hot path has it
        assert fresh_node.answer("client1", "www.upstream.test") == ["192.0.2.53"]
    out = fresh_node.dig("client1", f"@{elsewhere}", "www.upstream.test")
    assert "status: REFUSED" in out, out
    assert fresh_node.answer("client1", f"@{elsewhere}", SVC1) == [INTERCEPTED]
    assert fresh_node.answer("client1", "www.upstream.test") == ["192.0.2.53"]
    script = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    )
    text = sh("/usr/bin/python3", "-c", script, netns=fresh_node.lab.node).stdout
    assert "interceptor_forward_not_allowed_total 1.0" in text


def test_an_allowed_extra_server_is_forwarded_to(fresh_node: Node) -> None:
    elsewhere = "10.96.0.53"  # allowed, so forwarded; nothing answers there: SERVFAIL
    fresh_node.start_agent(
        "--capture-all", "--allow-forward", elsewhere, "--upstream-timeout", "0.3"
    )
    for _ in range(3):  # the captured server's answer, cached: not the other server's
        assert fresh_node.answer("client1", "www.upstream.test") == ["192.0.2.53"]
    out = fresh_node.dig("client1", f"@{elsewhere}", "www.upstream.test")
    assert "status: SERVFAIL" in out, out


def test_the_agent_never_maps_bcc_or_llvm(node: Node) -> None:
    """The programs are built by a short-lived child: libbcc (and LLVM in it) never enters
    the long-running agent, only the child that exited."""
    pid = node.agent_pid()
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "python" in Path(f"/proc/{pid}/cmdline").read_text()
    assert "libbcc" not in maps and "libLLVM" not in maps and "libclang" not in maps
    assert (node.pin_dir / "progs" / "dnsi_from_pod").exists()  # what the agent attached

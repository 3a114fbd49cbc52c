"""The inspection verbs, the metrics and the health endpoints against a real agent on the
netns node: real programs, real pinned maps, real tc filters (ours and a foreign one), real
queries from pods.  The map/net/prog verbs are run again after the agent is SIGKILLed.
Root only."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devlab.netns import sh, stop
from tests.helpers import ROOT, free_tcp_ports, start_serve
from tests.lab.conftest import Node, make_node

METRICS = "127.0.0.1:9253"
HEALTH = "127.0.0.1:8053"
SVC1 = "svc1.ns1.svc.cluster.local"
FOREIGN_PRIO = 5


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One agent for the module; the last test kills it.  Fixed ports are safe: nothing else
    listens inside this lab's fresh node namespace."""
    for n in make_node("ptp", tmp_path_factory.mktemp("inspect")):
        n.start_agent("--metrics-address", METRICS, "--health-address", HEALTH)
        _attach_foreign_filter(n)
        link = Path(f"/sys/fs/bpf/{n.lab.prefix}-tcx")
        try:
            _attach_tcx(n, link)
            yield n
        finally:
            link.unlink(missing_ok=True)  # the last reference: the link detaches


def _attach_foreign_filter(node: Node) -> None:
    """A CNI's program at a later prio on client2's veth: shown as FOREIGN, never ours."""
    from bcc import BPF
    from pyroute2 import NetNS

    prog = BPF(text=b"int cni_policy(struct __sk_buff *skb) { return -1; }")
    fn = prog.load_func(b"cni_policy", BPF.SCHED_CLS)
    with NetNS(node.lab.node) as ns:
        idx = ns.link_lookup(ifname=node.lab.host_veth("client2"))[0]
        ns.tc(
            "add-filter",
            "bpf",
            idx,
            0x7,
            fd=fn.fd,
            name="cni_policy",
            parent="ffff:fff2",
            classid=1,
            direct_action=True,
            prio=FOREIGN_PRIO,
        )
    prog.cleanup()  # the filter keeps the program loaded; the lab's netns takes it away


TCX_SCRIPT = """
import ctypes as ct, socket, struct, sys
from bcc import BPF

BPF_OBJ_PIN, BPF_LINK_CREATE, BPF_TCX_INGRESS, SYS_BPF = 6, 28, 46, 321
libc = ct.CDLL(None, use_errno=True)
prog = BPF(text=b"int tcx_policy(struct __sk_buff *skb) { return -1; }")  # TCX_NEXT
fn = prog.load_func(b"tcx_policy", BPF.SCHED_CLS)
attr = (ct.c_ubyte * 128)()
struct.pack_into("=IIII", attr, 0, fn.fd, socket.if_nametoindex(sys.argv[1]), BPF_TCX_INGRESS, 0)
link = libc.syscall(SYS_BPF, BPF_LINK_CREATE, ct.byref(attr), 128)
assert link >= 0, ct.get_errno()
path = ct.create_string_buffer(sys.argv[2].encode())
attr = (ct.c_ubyte * 128)()
struct.pack_into("=QI", attr, 0, ct.addressof(path), link)
assert libc.syscall(SYS_BPF, BPF_OBJ_PIN, ct.byref(attr), 128) == 0, ct.get_errno()
"""


def _attach_tcx(node: Node, pin: Path) -> None:
    """A tcx program (kernel >= 6.6, as newer Cilium uses) on client1's veth, pinned as a
    link so it outlives the process that made it.  It returns TCX_NEXT: our filters run."""
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{node.lab.node}", sys.executable, "-c", TCX_SCRIPT]
        + [node.lab.host_veth("client1"), str(pin)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def cli(node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``interceptor ARGS`` in the node's network namespace (nsenter --net only: bpffs and
    /run stay the host's, as for a hostNetwork pod)."""
    cmd = [
        "nsenter",
        f"--net=/run/netns/{node.lab.node}",
        sys.executable,
        "-m",
        "interceptor",
        *args,
        "--state-dir",
        str(node.lab.state_dir),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if check:
        assert r.returncode == 0, f"{' '.join(args)}: rc {r.returncode}\n{r.stderr}"
    return r


def cli_json(node: Node, *args: str) -> Any:
    out = cli(node, "-j", *args).stdout
    return json.loads(out)


def assert_table(text: str) -> None:
    """Upper-case headers and nothing past column 80."""
    lines = text.splitlines()
    assert lines and max(len(ln) for ln in lines) <= 80, text
    heads = [ln for ln in lines if ln and ln.split()[0].isupper()]
    assert heads, text


def http_get(node: Node, url: str) -> tuple[int, str]:
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen({url!r}, timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    r = sh("/usr/bin/python3", "-c", script, netns=node.lab.node)
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{sel}}}" if sel else name) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    assert m, f"{name}{{{sel}}} not in the scrape"
    return float(m.group(1))


def pod_row(stats: dict[str, Any], pod: str) -> dict[str, Any]:
    return next(p for p in stats["pods"] if p["pod"] == pod)


# ----------------------------------------------------------------------------- agent up


def test_net_show_our_programs_their_pods_and_a_foreign_filter(node: Node) -> None:
    text = cli(node, "net", "show").stdout
    assert_table(text)
    rows = [ln.split() for ln in text.splitlines() if ln.strip()]
    assert ["dvh0", "ingress", "tc", "1", "0x1d5"] == rows_for(rows, "dvh0", "ingress")[:5]
    assert "dnsi_from_pod" in text and "dnsi_to_pod" in text
    dvh0 = [r for r in rows if r[0] == "dvh0" and "dnsi" in r[6]]
    assert len(dvh0) == 2 and all(r[-1] == "ns1/client1" and r[-2] == "ours" for r in dvh0)
    foreign = [r for r in rows if "cni_policy" in r]
    assert foreign and foreign[0][:4] == ["dvh1", "ingress", "tc", str(FOREIGN_PRIO)]
    assert "FOREIGN" in foreign[0] and "FOREIGN:" in text
    assert not any(r[0] in ("dvh2", "dvh3", "dvh4") for r in rows)  # pods not captured
    tcx = [r for r in rows if "tcx_policy" in r]
    assert tcx and tcx[0][:5] == ["dvh0", "ingress", "tcx", "-", "-"] and "FOREIGN" in tcx[0]
    assert node.answer("client1", SVC1) == ["10.96.1.1"]  # TCX_NEXT: our filter still runs

    data = cli_json(node, "net", "show", "dev", "dvh1")
    assert [i["ifname"] for i in data["interfaces"]] == ["dvh1"]
    hooks = data["interfaces"][0]["hooks"]
    assert {(h["name"], h["ours"]) for h in hooks} == {
        ("dnsi_from_pod", True),
        ("dnsi_to_pod", True),
        ("cni_policy", False),
    }
    assert all(isinstance(h["prog_id"], int) and h["prog_id"] > 0 for h in hooks)
    assert data["interfaces"][0]["pods"] == ["ns1/client2"]
    r = cli(node, "net", "show", "dev", "nosuch0", check=False)
    assert r.returncode == 1 and "nosuch0" in r.stderr and "Traceback" not in r.stderr


def rows_for(rows: list[list[str]], iface: str, hook: str) -> list[str]:
    return next(r for r in rows if r[:2] == [iface, hook])


def test_prog_show_our_programs_and_their_maps(node: Node) -> None:
    text = cli(node, "prog", "show").stdout
    assert_table(text)
    assert "dnsi_from_pod" in text and "cni_policy" not in text  # the CNI's is not ours
    data = cli_json(node, "prog", "show")
    progs = {p["name"]: p for p in data["programs"]}
    assert set(progs) >= {"dnsi_from_pod", "dnsi_to_pod"}
    p = progs["dnsi_from_pod"]
    assert re.fullmatch(r"[0-9a-f]{16}", p["tag"]) and p["type"] == "sched_cls"
    assert {"CONFIG", "FLOWS", "PODS", "REASONS", "POD_STATS"} <= {m["name"] for m in p["maps"]}
    assert sorted(p["attached"]) == ["dvh0/ingress", "dvh1/ingress"]
    enabled = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
    assert data["stats_enabled"] is enabled
    if not enabled:
        assert "kernel.bpf_stats_enabled=0" in text  # zeros are explained, not shown silently


def test_map_show_and_dump_a_flow_after_a_query(node: Node) -> None:
    assert node.answer("client1", "www.upstream.test") == ["192.0.2.53"]  # makes a flow
    text = cli(node, "map", "show").stdout
    assert_table(text)
    maps = {m["name"]: m for m in cli_json(node, "map", "show")["maps"]}
    assert {"CONFIG", "CAPTURE", "PODS", "IFACES", "FLOWS", "REASONS", "POD_STATS"} <= set(maps)
    assert maps["FLOWS"]["type"] == "lru_hash" and maps["FLOWS"]["entries"] >= 1
    assert maps["IFACES"]["entries"] == 2 and maps["CAPTURE"]["entries"] == 2

    text = cli(node, "map", "dump", "FLOWS").stdout
    assert_table(text)
    flows = cli_json(node, "map", "dump", "FLOWS")["entries"]
    mine = [f for f in flows if f["key"]["pod_ip"] == "10.244.1.10"]
    assert mine, flows
    assert mine[0]["value"]["server"] == "10.96.0.10" and mine[0]["value"]["pod"] == "ns1/client1"
    assert mine[0]["value"]["iface"] == "dvh0" and mine[0]["value"]["age_s"] < 60

    cfg = cli_json(node, "map", "dump", "name", "config")["entries"][0]["value"]
    assert cfg["alive"] is True and cfg["heartbeat_age_s"] < 1.0
    assert cfg["resolver4"] == "169.254.20.10"
    assert "heartbeat_age_s" in cli(node, "map", "dump", "CONFIG").stdout
    pods = cli_json(node, "map", "dump", "PODS")["entries"]
    assert {(p["key"]["ip"], p["value"]["pod"]) for p in pods} == {
        ("10.244.1.10", "ns1/client1"),
        ("fd00:10:244::10", "ns1/client1"),
        ("10.244.1.11", "ns1/client2"),
    }
    r = cli(node, "map", "dump", "NOPE", check=False)
    assert r.returncode == 1 and "FLOWS" in r.stderr  # names the maps there are


def test_stats_counters_increase_with_queries(node: Node) -> None:
    before = cli_json(node, "stats")
    for _ in range(3):
        assert node.answer("client2", "www.upstream.test") == ["192.0.2.53"]
    after = cli_json(node, "stats")
    b, a = pod_row(before, "ns1/client2"), pod_row(after, "ns1/client2")
    assert a["queries"] >= b["queries"] + 3
    assert a["redirected"] >= b["redirected"] + 3  # forwarded names go to the resolver
    assert a["ifnames"] == ["dvh1"] and a["ips"] == ["10.244.1.11"]
    reasons = {c["reason"]: c for c in after["counters"][0]["counts"]}
    assert reasons["redirected"]["count"] >= 3 and reasons["redirected"]["verdict"] == "rewritten"
    assert reasons["no_socket"]["verdict"] == "fail-open"
    assert reasons["csum_error"]["verdict"] == "dropped"
    assert after["agent_running"] is True and after["interfaces"] == 2
    text = cli(node, "stats").stdout
    assert_table(text)
    assert "ns1/client1" in text and "agent running" in text


def test_top_shows_live_rates(node: Node) -> None:
    loop = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            node.lab.pod_ns("client1"),
            "sh",
            "-c",
            "for i in $(seq 400); do dig +short +time=1 +tries=1 www.upstream.test; done",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        text = cli(node, "top", "--count", "2", "--interval", "0.5").stdout
    finally:
        loop.kill()
        loop.wait()
    frames = [f for f in text.split("interceptor top:") if f.strip()]
    assert len(frames) == 2
    last = frames[-1].splitlines()
    assert max(len(ln) for ln in last) <= 80
    row = next(ln.split() for ln in last if ln.startswith("ns1/client1"))
    assert float(row[2]) > 0, text  # QUERIES/S
    assert "\x1b[" not in text  # not a terminal: plain frames, no escapes


def _top_on_a_terminal(node: Node) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{node.lab.node}",
            sys.executable,
            "-m",
            "interceptor",
            "top",
            "--interval",
            "0.2",
            "--state-dir",
            str(node.lab.state_dir),
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
    )
    os.close(slave)
    return proc, master


def _read_all(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return out


def test_top_on_a_terminal_refreshes_in_place_and_quits_on_q_or_ctrl_c(node: Node) -> None:
    proc, master = _top_on_a_terminal(node)
    try:
        time.sleep(1.5)
        os.write(master, b"q")
        assert proc.wait(5) == 0
        screen = _read_all(master)
    finally:
        os.close(master)
    assert screen.count(b"\x1b[H\x1b[2J") >= 2 and b"ns1/client1" in screen
    proc, master = _top_on_a_terminal(node)
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(5) == 0
        assert b"Traceback" not in _read_all(master)
    finally:
        os.close(master)


def test_services_and_query_over_the_admin_socket(node: Node) -> None:
    sock = node.lab.state_dir / "admin.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    text = cli(node, "services").stdout
    assert_table(text)
    assert re.search(r"ns1\s+svc1\s+ClusterIP\s+10\.96\.1\.1\s+http:80/tcp", text), text
    assert re.search(r"ns1\s+auto\.mesh\.test\s+mesh\s+240\.240\.", text), text
    assert [s["name"] for s in cli_json(node, "services", "svc1")] == ["svc1"]

    q = cli_json(node, "query", SVC1, "--from", "10.244.1.10")
    assert [r["data"] for r in q["answer"]["answer"]] == ["10.96.1.1"]
    assert q["explanation"]["rule"] == "clusterip-service"
    assert q["explanation"]["objects"] == ["Service ns1/svc1"]
    q = cli_json(node, "query", "www.upstream.test", "A", "--from", "10.244.1.10")
    assert [r["data"] for r in q["answer"]["answer"]] == ["192.0.2.53"]
    assert q["explanation"]["rule"] == "forwarded" and q["explanation"]["upstreams"]
    text = cli(node, "query", "example.com.ns1.svc.cluster.local").stdout
    assert "NXDOMAIN" in text and "search-path-junk" in text and "Namespace ns1" in text
    assert max(len(ln) for ln in text.splitlines()) <= 100  # records as dig prints them
    r = cli(node, "query", SVC1, "BOGUS", check=False)
    assert r.returncode == 1 and "unknown query type" in r.stderr


def test_metrics_have_the_documented_bpf_and_datapath_names(node: Node) -> None:
    assert node.answer("client1", "www.upstream.test") == ["192.0.2.53"]
    status, text = http_get(node, f"http://{METRICS}/metrics")
    assert status == 200
    assert metric(text, "interceptor_bpf_events_total", reason="redirected") >= 1
    assert metric(text, "interceptor_bpf_events_total", reason="spoofed") >= 0
    for name in ("queries", "redirected"):
        assert (
            metric(text, f"interceptor_bpf_pod_{name}_total", namespace="ns1", pod="client1") >= 1
        )
    assert metric(text, "interceptor_bpf_pod_passed_total", namespace="ns1", pod="client2") == 0
    assert metric(text, "interceptor_datapath_interfaces") == 2
    assert metric(text, "interceptor_datapath_programming_seconds_count") >= 1
    assert metric(text, "interceptor_datapath_programming_seconds_sum") > 0
    # The per-pod figure is the kernel's, summed over CPUs: it matches `stats` exactly
    # (client2 is idle now, so nothing moves between the two reads).
    stats = pod_row(cli_json(node, "stats"), "ns1/client2")
    assert (
        metric(text, "interceptor_bpf_pod_queries_total", namespace="ns1", pod="client2")
        == stats["queries"]
    )
    if (node.pin_dir / "FP_STATS").exists():
        assert metric(text, "interceptor_fastpath_total", result="hit") >= 0


def test_health_endpoints(node: Node) -> None:
    status, body = http_get(node, f"http://{HEALTH}/healthz")
    assert status == 200 and "resolver answered dns-version.cluster.local TXT" in body
    status, body = http_get(node, f"http://{HEALTH}/readyz")
    assert status == 200 and "capturing on 2 veth(s)" in body


def test_not_root_is_told_so(node: Node) -> None:
    for verb in (["map", "show"], ["stats"], ["prog", "show"]):
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
            + ["-m", "interceptor", *verb, "--pin-path", str(node.pin_dir)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert r.returncode == 1 and "needs root" in r.stderr, (verb, r.stderr)
        assert "Traceback" not in r.stderr


def test_help_has_examples(node: Node) -> None:
    for verb in ("net", "prog", "map", "stats", "services", "query", "top"):
        text = cli(node, verb, "--help").stdout
        assert "examples:" in text and f"interceptor {verb}" in text


# ----------------------------------------------------------------------------- agent killed


def test_map_net_prog_verbs_after_sigkill(node: Node) -> None:
    assert node.agent is not None
    node.agent.proc.send_signal(signal.SIGKILL)
    node.agent.proc.wait()
    node.agent = None
    time.sleep(1.2)  # past the heartbeat timeout

    rows = [ln.split() for ln in cli(node, "net", "show").stdout.splitlines() if ln.strip()]
    assert rows_for(rows, "dvh0", "ingress")[-2:] == ["ours", "ns1/client1"]
    progs = {p["name"] for p in cli_json(node, "prog", "show")["programs"]}
    assert {"dnsi_from_pod", "dnsi_to_pod"} <= progs  # the filters keep them loaded
    assert {m["name"] for m in cli_json(node, "map", "show")["maps"]} >= {"FLOWS", "CONFIG"}
    cfg = cli_json(node, "map", "dump", "CONFIG")["entries"][0]["value"]
    assert cfg["alive"] is False and cfg["heartbeat_age_s"] >= 1.0
    assert any(
        f["value"]["pod"] == "ns1/client1"
        for f in cli_json(node, "map", "dump", "FLOWS")["entries"]
    )

    # A pod's query now fails open to kube-dns: counted, and still named in `stats`.
    assert node.answer("client1", "+time=1", SVC1) == ["10.96.99.99"]
    stats = cli_json(node, "stats")
    assert stats["agent_running"] is False
    assert pod_row(stats, "ns1/client1")["passed"] >= 1
    assert "agent not running" in cli(node, "stats").stdout
    text = cli(node, "top", "--once", "--interval", "0.2").stdout
    assert "AGENT NOT RUNNING" in text and "ns1/client1" in text

    for verb in (["services"], ["query", SVC1]):
        r = cli(node, *verb, check=False)
        assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr
    assert os.path.exists(node.lab.state_dir / "state.json")


# ----------------------------------------------------------------------------- serve


def test_serve_admin_socket_and_healthz(tmp_path: Path) -> None:
    """``interceptor serve`` has the same admin endpoint (opt-in) and the same /healthz."""
    sock = tmp_path / "admin.sock"
    (health,) = free_tcp_ports(1)
    served = start_serve("--admin-socket", str(sock), "--health-address", f"127.0.0.1:{health}")
    try:
        cmd = [sys.executable, "-m", "interceptor", "-j", "query", "--admin-socket", str(sock)]
        r = subprocess.run([*cmd, SVC1], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert r.returncode == 0, r.stderr
        q = json.loads(r.stdout)
        assert [a["data"] for a in q["answer"]["answer"]] == ["10.96.1.1"]
        assert q["explanation"]["rule"] == "clusterip-service"
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as resp:
            assert resp.status == 200
            assert b"resolver answered dns-version.cluster.local TXT" in resp.read()
    finally:
        stop(served.proc)
    assert not sock.exists()  # removed on a clean stop

"""The inspection layer without a kernel: table layout, map decoding, counters and rates,
the metrics collector with a fake reader, the state file, query explanations against the
real resolver and service map, the admin socket, and the verbs' argument parsing."""

from __future__ import annotations

import asyncio
import ctypes as ct
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from interceptor.cli import build_parser
from interceptor.console.table import render
from interceptor.console.verbs import COMMANDS, EXAMPLES
from interceptor.datapath import maps
from interceptor.errors import InterceptorError
from interceptor.model.servicemap import ServiceMap
from interceptor.node.health import HealthServer, self_query
from interceptor.ops.admin import AdminError, AdminServer, request
from interceptor.ops.catalog import CATALOG, Context, decode
from interceptor.ops.collector import BpfCollector, programming_histogram
from interceptor.ops.counters import PodCounters, Snapshot, rates
from interceptor.ops.explain import explain, qtype_code, services
from interceptor.ops.state import (
    AgentInfo,
    NodeState,
    PodEntry,
    StateError,
    read_state,
    write_state,
)
from interceptor.resolve.resolver import Resolver
from interceptor.resolve.upstream import Forwarder
from interceptor.settings import Endpoint, Settings, UpstreamSettings, ZoneSettings
from interceptor.sources.yamlfile import load_file
from tests.helpers import DATA

# ----------------------------------------------------------------------------- tables


def test_table_headers_upper_sorted_numbers_right_aligned() -> None:
    out = render(["name", "count"], [("zeta", 5), ("alpha", 120), ("mid", 7)]).splitlines()
    assert out[0].split() == ["NAME", "COUNT"]
    assert [ln.split()[0] for ln in out[1:]] == ["alpha", "mid", "zeta"]
    assert out[2].endswith("    7") and out[1].endswith("  120")


def test_table_never_wider_than_80_columns() -> None:
    rows = [(f"namespace-{i}/" + "p" * 70, "fd00:10:244::" + "a" * 20, i * 1000) for i in range(5)]
    out = render(["pod", "addresses", "queries"], rows)
    assert max(len(ln) for ln in out.splitlines()) <= 80
    assert "…" in out
    assert "4000" in out  # numbers are never cut


# ----------------------------------------------------------------------------- decoding


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


def test_flow_entry_decoded_with_pod_name_server_and_age() -> None:
    key = maps.flow_key("10.244.1.11", 40000, socket.IPPROTO_UDP)
    val = maps.FlowVal()
    val.orig = maps.IpAddr.of("10.96.0.10")
    val.orig_port = socket.htons(53)
    val.ifindex = 8
    val.pod_id = 2
    val.created_ns = 1_000_000_000
    ctx = Context(state(), now_ns=3_500_000_000)
    row = decode(CATALOG["FLOWS"], bytes(key), [bytes(val)], ctx)
    assert row is not None
    assert row["key"] == {"pod_ip": "10.244.1.11", "pod_port": 40000, "proto": "udp"}
    v = row["value"]
    assert (v["server"], v["server_port"], v["pod"], v["iface"]) == (
        "10.96.0.10",
        53,
        "ns1/client2",
        "dvh1",
    )
    assert v["age_s"] == 2.5


def test_ipv6_flow_server_uses_the_key_family() -> None:
    key = maps.flow_key("fd00:10:244::10", 5353, socket.IPPROTO_TCP)
    val = maps.FlowVal()
    val.orig = maps.IpAddr.of("fd00:96::a")
    row = decode(CATALOG["FLOWS"], bytes(key), [bytes(val)], Context(state()))
    assert row is not None and row["value"]["server"] == "fd00:96::a"
    assert row["key"]["proto"] == "tcp"


def test_percpu_values_are_summed_and_zero_slots_hidden() -> None:
    cpus = []
    for q in (3, 4, 0):
        s = maps.PodStats()
        s.queries, s.redirected = q, q
        cpus.append(bytes(s))
    row = decode(CATALOG["POD_STATS"], bytes(ct.c_uint32(2)), cpus, Context(state()))
    assert row is not None
    assert row["key"] == {"pod_id": 2, "pod": "ns1/client2"}
    assert row["value"]["queries"] == 7 and row["value"]["redirected"] == 7
    assert len(row["per_cpu"]) == 2  # CPUs that counted nothing are left out
    zero = [bytes(maps.PodStats())] * 3
    assert decode(CATALOG["POD_STATS"], bytes(ct.c_uint32(9)), zero, Context()) is None


def test_reason_counter_and_unknown_map_as_hex() -> None:
    values = [bytes(ct.c_uint64(n)) for n in (2, 5)]
    idx = maps.REASONS.index("no_socket")
    row = decode(CATALOG["REASONS"], bytes(ct.c_uint32(idx)), values, Context())
    assert row is not None and row["key"]["reason"] == "no_socket" and row["value"]["count"] == 7
    raw = decode(None, b"\x01\x02", [b"\xff"], Context())
    assert raw == {"key": {"hex": "01 02"}, "value": {"hex": "ff"}}


def test_config_heartbeat_age_and_liveness() -> None:
    cfg = maps.Config()
    cfg.heartbeat_ns = 10_000_000_000
    cfg.heartbeat_timeout = 1_000_000_000
    cfg.resolver4 = maps.IpAddr.of("169.254.20.10")
    cfg.flags = maps.CFG_SK_LOOKUP
    for now, alive in ((10_300_000_000, True), (12_000_000_000, False)):
        row = decode(CATALOG["CONFIG"], bytes(ct.c_uint32(0)), [bytes(cfg)], Context(now_ns=now))
        assert row is not None
        assert row["value"]["alive"] is alive
        assert row["value"]["resolver4"] == "169.254.20.10" and row["value"]["resolver6"] is None
        assert row["value"]["flags"] == ["sk_lookup"]


# ----------------------------------------------------------------------------- counters


def pod(name: str, queries: int, ns: str = "ns1") -> PodCounters:
    return PodCounters(ns, name, ("10.0.0.1",), ("dvh0",), (0,), {"queries": queries})


def test_rates_per_second_busiest_first_and_reused_slots_restart() -> None:
    before = Snapshot(0, (pod("a", 100), pod("b", 50), pod("c", 900)))
    after = Snapshot(2_000_000_000, (pod("a", 300), pod("b", 70), pod("c", 10)))
    out = rates(before, after)
    assert [(r.pod.name, r.rate("queries")) for r in out] == [("a", 100), ("b", 10), ("c", 5)]


# ----------------------------------------------------------------------------- metrics


def snapshot() -> Snapshot:
    return Snapshot(
        0,
        (
            PodCounters(
                "ns1",
                "client1",
                ("10.244.1.10",),
                ("dvh0",),
                (0, 1),
                {"queries": 12, "redirected": 10, "passed": 2},
            ),
        ),
        {
            "REASONS": {r: i for i, r in enumerate(maps.REASONS)},
            "FP_STATS": {"hit": 40, "miss": 3, "fallthrough": 1},
        },
        interfaces=3,
    )


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_collector_exports_the_documented_names() -> None:
    registry = CollectorRegistry()
    registry.register(BpfCollector(snapshot))
    programming_histogram(registry).observe(0.003)
    text = scrape(registry)
    idx = maps.REASONS.index("no_socket")
    assert f'interceptor_bpf_events_total{{reason="no_socket"}} {float(idx)}' in text
    assert 'interceptor_fastpath_total{result="hit"} 40.0' in text
    assert 'interceptor_bpf_pod_queries_total{namespace="ns1",pod="client1"} 12.0' in text
    assert 'interceptor_bpf_pod_redirected_total{namespace="ns1",pod="client1"} 10.0' in text
    assert 'interceptor_bpf_pod_passed_total{namespace="ns1",pod="client1"} 2.0' in text
    assert "interceptor_datapath_interfaces 3.0" in text
    assert "interceptor_datapath_programming_seconds_count 1.0" in text


def test_collector_survives_an_unreadable_map() -> None:
    def broken() -> Snapshot:
        raise InterceptorError("map gone")

    registry = CollectorRegistry()
    registry.register(BpfCollector(broken))
    assert "interceptor_bpf_events_total" not in scrape(registry)


# ----------------------------------------------------------------------------- state file


def test_state_file_round_trip_and_errors(tmp_path: Path) -> None:
    assert read_state(tmp_path) is None
    write_state(tmp_path, state())
    back = read_state(tmp_path)
    assert back is not None and back.pods == state().pods and back.agent == state().agent
    assert back.by_pod_id()[2].pod == "ns1/client2"
    assert [p.name for p in back.by_ifindex()[7]] == ["client1", "client1"]
    assert not list(tmp_path.glob(".state-*"))  # the temporary file was renamed
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="state.json"):
        read_state(tmp_path)


# ----------------------------------------------------------------------------- explain


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    m = ServiceMap(ZoneSettings())
    m.replace(load_file(DATA / "cluster.yaml").objects)
    s = Settings()
    return Resolver(m, Forwarder(s.upstream), s, [Endpoint("127.0.0.1", 9)])


A, AAAA, SRV, PTR, CNAME = 1, 28, 33, 12, 5


@pytest.mark.parametrize(
    ("name", "qtype", "rule", "objects"),
    [
        ("svc1.ns1.svc.cluster.local", A, "clusterip-service", ["Service ns1/svc1"]),
        ("svc1.ns1.svc.cluster.local", AAAA, "nodata", ["Service ns1/svc1"]),
        (
            "hdls.ns1.svc.cluster.local",
            A,
            "headless-service",
            [
                "Service ns1/hdls",
                "EndpointSlice ns1/hdls-a",
                "EndpointSlice ns1/hdls-b",
                "EndpointSlice ns1/hdls-v6",
            ],
        ),
        (
            "pet-0.hdls.ns1.svc.cluster.local",
            A,
            "headless-endpoint",
            ["Service ns1/hdls", "EndpointSlice ns1/hdls-a", "EndpointSlice ns1/hdls-b"],
        ),
        ("_http._tcp.svc1.ns1.svc.cluster.local", SRV, "srv", ["Service ns1/svc1"]),
        ("1.1.96.10.in-addr.arpa", PTR, "ptr", ["Service ns1/svc1"]),
        ("ext.ns1.svc.cluster.local", A, "externalname", ["Service ns1/ext"]),
        ("auto.mesh.test", A, "mesh-vip", ["ServiceEntry ns1/auto"]),
        ("x.y.wild.test", A, "mesh-wildcard", ["ServiceEntry ns1/wild"]),
        ("10-1-2-3.ns1.pod.cluster.local", A, "pod-record", ["Namespace ns1"]),
        ("ns1.svc.cluster.local", A, "empty-non-terminal", ["Namespace ns1"]),
        ("example.com.ns1.svc.cluster.local", A, "search-path-junk", ["Namespace ns1"]),
        ("nope.cluster.local", A, "nxdomain", []),
        ("dns-version.cluster.local", 16, "apex", ["Service kube-system/kube-dns"]),
        ("www.example.com", A, "forwarded", []),
    ],
)
def test_explanations(
    resolver: Resolver, name: str, qtype: int, rule: str, objects: list[str]
) -> None:
    why = explain(resolver, name, qtype, None)
    assert (why.rule, why.objects) == (rule, objects), why.detail
    if rule == "forwarded":
        assert why.upstreams == ["127.0.0.1:9"]


def test_explanation_before_the_first_sync(resolver: Resolver) -> None:
    resolver.ready = False
    try:
        assert explain(resolver, "svc1.ns1.svc.cluster.local", A, None).rule == "not-synced"
        assert explain(resolver, "www.example.com", A, None).rule == "forwarded"
    finally:
        resolver.ready = True


def test_services_listing_and_filters(resolver: Resolver) -> None:
    all_ = services(resolver)
    svc1 = [s for s in all_ if s["name"] == "svc1"][0]
    assert svc1["type"] == "ClusterIP" and svc1["addresses"] == ["10.96.1.1"]
    assert "http:80/tcp" in svc1["ports"]
    assert {s["dns_name"] for s in services(resolver, "auto")} == {
        "auto.mesh.test",
        "auto2.mesh.test",
    }
    hdls = services(resolver, "ns1/hdls")
    assert len(hdls) == 1 and hdls[0]["type"] == "Headless"
    assert "172.0.0.4" not in hdls[0]["addresses"]  # not ready
    assert services(resolver, "ext.ns1.svc.cluster.local")[0]["external_name"] == (
        "www.upstream.test"
    )
    assert services(resolver, "no-such") == []


def test_qtype_names() -> None:
    assert (qtype_code("aaaa"), qtype_code("TYPE65"), qtype_code("33")) == (28, 65, 33)
    with pytest.raises(ValueError):
        qtype_code("BOGUS")


# ----------------------------------------------------------------------------- admin socket


@pytest.fixture
def admin(resolver: Resolver, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "admin.sock"
    loop = asyncio.new_event_loop()
    server = AdminServer(path, resolver, lambda: {"pid": os.getpid()})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_admin_socket_is_private_and_answers(admin: Path) -> None:
    assert oct(admin.stat().st_mode & 0o777) == "0o600"
    assert request(admin, {"op": "status"}) == {"pid": os.getpid()}
    out = request(admin, {"op": "query", "name": "svc1.ns1.svc.cluster.local", "type": "A"})
    assert out["answer"]["rcode"] == "NOERROR"
    assert [r["data"] for r in out["answer"]["answer"]] == ["10.96.1.1"]
    assert out["explanation"]["rule"] == "clusterip-service"
    out = request(admin, {"op": "query", "name": "a.b.ns1.svc.cluster.local", "from": "10.0.0.1"})
    assert out["answer"]["rcode"] == "NXDOMAIN" and out["question"]["from"] == "10.0.0.1"
    assert request(admin, {"op": "services", "name": "svc1"})[0]["namespace"] == "ns1"


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"op": "query", "name": "x.cluster.local", "type": "NOPE"}, "unknown query type"),
        ({"op": "query", "name": "a..b"}, "not a valid domain name"),
        ({"op": "query", "name": "x", "from": "not-an-ip"}, "not an IP address"),
        ({"op": "frobnicate"}, "unknown op"),
    ],
)
def test_admin_bad_requests_get_a_message(admin: Path, req: dict[str, Any], error: str) -> None:
    with pytest.raises(AdminError, match=error):
        request(admin, req)


def test_admin_garbage_and_stale_socket(admin: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin))
        s.sendall(b"{{{\n")
        assert json.loads(s.recv(4096))["ok"] is False
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed agent leaves
    with pytest.raises(InterceptorError, match="not running"):
        request(stale, {"op": "status"})
    with pytest.raises(InterceptorError, match="is the agent running"):
        request(tmp_path / "missing.sock", {"op": "status"})


def test_second_server_on_a_live_socket_refuses(admin: Path, resolver: Resolver) -> None:
    other = AdminServer(admin, resolver, dict)
    with pytest.raises(AdminError, match="already serves"):
        asyncio.run(other.start())


# ----------------------------------------------------------------------------- health


def test_health_self_query_reports_a_silent_resolver(tmp_path: Path) -> None:
    async def run() -> tuple[bool, str]:
        # A UDP socket that never answers: the probe must time out, not hang.
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            return await self_query(Endpoint("127.0.0.1", port), "cluster.local", timeout=0.2)
        finally:
            transport.close()

    ok, why = asyncio.run(run())
    assert not ok and "did not answer" in why


def test_health_server_awaits_async_checks() -> None:
    async def run() -> bytes:
        async def alive() -> tuple[bool, str]:
            return False, "resolver down"

        server = HealthServer(Endpoint("127.0.0.1", 0), lambda: (True, "ok"), alive)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data
        finally:
            await server.close()

    data = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 503") and data.endswith(b"resolver down\n")


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv",
    [
        ["-j", "net", "show"],
        ["net", "show", "-j"],
        ["net", "-j", "show", "dev", "dvh0"],
    ],
)
def test_json_flag_before_or_after_the_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.json and args.command == "net" and args.action == "show"


def test_every_verb_has_examples_in_its_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in COMMANDS:
        help_text = sub.choices[cmd].format_help()  # type: ignore[attr-defined]
        assert "examples:" in help_text and EXAMPLES[cmd].splitlines()[1].strip() in help_text
    assert "interceptor net show" in parser.format_help()


def test_bad_usage_is_one_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from interceptor.cli import main

    rc = main(["net", "show", "eth0", "--state-dir", "/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("Error:") and "net show [dev IFACE]" in err
    rc = main(["map", "dump", "FLOWS", "--pin-path", "/nonexistent", "--state-dir", "/x"])
    err = capsys.readouterr().err
    assert rc == 1 and "/nonexistent does not exist" in err and "Traceback" not in err


def test_top_frame_busiest_pod_first_within_80_columns() -> None:
    from interceptor.console.top import frame

    before = Snapshot(0, (pod("quiet", 10), pod("busy", 0, ns="a-rather-long-namespace-name")))
    after = Snapshot(
        1_000_000_000, (pod("quiet", 11), pod("busy", 250, ns="a-rather-long-namespace-name"))
    )
    text = frame(before, after, state(), 1.0)
    lines = text.splitlines()
    assert lines[0].startswith("interceptor top: 2 pods, 251.0 q/s")
    assert "AGENT NOT RUNNING" in lines[0]  # pid 1 is not an interceptor
    assert lines[2].split()[:3] == ["POD", "IFACE", "QUERIES/S"]
    assert lines[3].startswith("a-rather-long-namespace") and lines[4].startswith("ns1/quiet")
    assert max(len(ln) for ln in lines) <= 80


def test_stats_on_a_directory_without_our_maps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from interceptor.cli import main

    rc = main(["stats", "--pin-path", str(tmp_path), "--state-dir", str(tmp_path)])
    assert rc == 1 and "no interceptor counters pinned" in capsys.readouterr().err


def test_forwarding_explanations_follow_the_servers_in_effect() -> None:
    m = ServiceMap(ZoneSettings())
    s = Settings(
        upstream=UpstreamSettings(
            servers=(Endpoint("192.0.2.1", 53),),
            zones=(("corp.example", (Endpoint("192.0.2.9", 5353),)),),
        )
    )
    r = Resolver(m, Forwarder(s.upstream), s, [Endpoint("127.0.0.1", 9)])
    why = explain(r, "db.corp.example", A, None)
    assert "corp.example" in why.detail and why.upstreams == ["192.0.2.9:5353"]
    why = explain(r, "www.example.org", A, ("10.244.1.10", 0))
    assert "--upstream" in why.detail and why.upstreams == ["192.0.2.1:53"]

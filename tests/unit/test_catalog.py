"""Reading pinned maps without a kernel: decoding keys and values, summing per-CPU slots,
counters and their rates."""

from __future__ import annotations

import ctypes as ct
import socket

from interceptor.datapath import maps
from interceptor.ops.catalog import CATALOG, Context, decode
from interceptor.ops.counters import Snapshot, rates
from tests.unit.samples import pod, state

# ----------------------------------------------------------------------------- decoding


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


def test_rates_per_second_busiest_first_and_reused_slots_restart() -> None:
    before = Snapshot(0, (pod("a", 100), pod("b", 50), pod("c", 900)))
    after = Snapshot(2_000_000_000, (pod("a", 300), pod("b", 70), pod("c", 10)))
    out = rates(before, after)
    assert [(r.pod.name, r.rate("queries")) for r in out] == [("a", 100), ("b", 10), ("c", 5)]


def test_every_registered_map_has_a_decoder_and_the_registrys_types() -> None:
    assert CATALOG.keys() == maps.REGISTRY.keys()
    for name, spec in CATALOG.items():
        d = maps.REGISTRY[name]
        assert (spec.key, spec.value, spec.percpu, spec.doc) == (d.key, d.value, d.percpu, d.doc)

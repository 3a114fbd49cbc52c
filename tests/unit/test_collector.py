"""The Prometheus collector of the kernel's counters, with a fake reader."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from interceptor.datapath import maps
from interceptor.errors import InterceptorError
from interceptor.ops.collector import BpfCollector, programming_histogram
from interceptor.ops.counters import PodCounters, Snapshot

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

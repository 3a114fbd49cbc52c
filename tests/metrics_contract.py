"""The metric-name contract: every metric the agent exports, with its type and labels.

One list for everything that depends on the names: the Grafana dashboard
(deploy/dashboard.json, checked by tests/process/test_deploy.py), the smoke test
(deploy/smoke-test.sh), and tests that scrape a live agent and compare.  A metric added to
or renamed in the agent is added or renamed here, and the dashboard test then tells whether
the dashboard still matches.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    """The family name as exposed: counters end in ``_total``."""
    type: str
    """counter, gauge or histogram."""
    labels: frozenset[str]


def _m(name: str, type_: str, *labels: str) -> Metric:
    return Metric(name, type_, frozenset(labels))


METRICS: tuple[Metric, ...] = (
    # Kubernetes source and service map
    _m("interceptor_kube_synced", "gauge", "resource"),
    _m("interceptor_kube_api_reachable", "gauge", "resource"),
    _m("interceptor_kube_watch_events_total", "counter"),
    _m("interceptor_kube_lists_total", "counter"),
    _m("interceptor_kube_watch_errors_total", "counter"),
    _m("interceptor_service_map_objects", "gauge", "kind"),
    _m("interceptor_service_map_answers", "gauge"),
    # node cache for forwarded answers
    _m("interceptor_cache_hits_total", "counter"),
    _m("interceptor_cache_misses_total", "counter"),
    _m("interceptor_cache_evictions_total", "counter"),
    _m("interceptor_cache_stale_served_total", "counter"),
    _m("interceptor_cache_prefetches_total", "counter"),
    _m("interceptor_cache_entries", "gauge"),
    _m("interceptor_cache_bytes", "gauge"),
    # userspace resolver; source: authoritative|mesh|cache|upstream|stale|error
    _m("interceptor_requests_total", "counter", "proto", "qtype", "rcode", "source"),
    _m("interceptor_request_duration_seconds", "histogram", "source"),
    # forwarding; outcome: ok|timeout|error|truncated
    _m("interceptor_upstream_requests_total", "counter", "server", "outcome"),
    _m("interceptor_upstream_duration_seconds", "histogram", "server"),
    _m("interceptor_upstream_healthy", "gauge", "server"),
    _m("interceptor_autopath_total", "counter", "result"),
    _m("interceptor_forward_not_allowed_total", "counter"),
    _m("interceptor_client_queue_dropped_total", "counter", "reason"),
    _m("interceptor_tcp_connections_refused_total", "counter", "reason"),
    # BPF datapath (per-CPU map slots summed at scrape time)
    _m("interceptor_bpf_events_total", "counter", "reason"),
    _m("interceptor_bpf_pod_queries_total", "counter", "namespace", "pod"),
    _m("interceptor_bpf_pod_redirected_total", "counter", "namespace", "pod"),
    _m("interceptor_bpf_pod_passed_total", "counter", "namespace", "pod"),
    _m("interceptor_datapath_interfaces", "gauge"),
    _m("interceptor_datapath_programming_seconds", "histogram"),
    # in-kernel fast path; result: hit|miss|fallthrough|nxdomain
    _m("interceptor_fastpath_total", "counter", "result"),
    _m("interceptor_build_info", "gauge", "version"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

TARGET_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus adds to every scraped series."""


def family_of(series: str) -> Metric | None:
    """The contract metric a series name belongs to (``x_bucket`` -> histogram ``x``)."""
    if series in BY_NAME:
        return BY_NAME[series]
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in BY_NAME and BY_NAME[base].type == "histogram":
            return BY_NAME[base]
    return None


def series_names() -> set[str]:
    """Every series name the contract allows in an exposition (histograms expanded)."""
    out: set[str] = set()
    for m in METRICS:
        if m.type == "histogram":
            out.update(m.name + s for s in HISTOGRAM_SUFFIXES)
        else:
            out.add(m.name)
    return out

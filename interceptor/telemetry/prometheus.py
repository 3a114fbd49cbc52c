"""Prometheus metrics (prometheus-client), exported on ``--metrics-address``.

Collectors read state at scrape time and take what they read as constructor arguments, so
tests hand them fakes (client_python's ProcessCollector pattern)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from interceptor.resolve.cache import CacheStats
from interceptor.settings import Endpoint
from interceptor.sources.kube import SyncState
from interceptor.telemetry.stats import DURATION_BUCKETS, SOURCES, RequestStats, UpstreamStats


class WatchCollector(Collector):
    """The Kubernetes watch: sync state, API reachability, events, relists, errors."""

    def __init__(self, state: Callable[[], SyncState | None]) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        st = self.state()
        if st is None:
            return
        synced = GaugeMetricFamily(
            "interceptor_kube_synced",
            "1 once a resource's first list has been applied",
            labels=["resource"],
        )
        up = GaugeMetricFamily(
            "interceptor_kube_api_reachable",
            "1 while the last list or watch of a resource worked; 0 means "
            "answers come from the last known state",
            labels=["resource"],
        )
        for kind in sorted(st.required):
            synced.add_metric([kind], 1.0 if kind in st.synced else 0.0)
            up.add_metric([kind], 1.0 if st.connected.get(kind) else 0.0)
        yield synced
        yield up
        yield CounterMetricFamily(
            "interceptor_kube_watch_events",
            "Watch events applied to the service map",
            value=st.events,
        )
        yield CounterMetricFamily(
            "interceptor_kube_lists",
            "Full lists (first sync and relists after 410 Gone)",
            value=st.relists,
        )
        yield CounterMetricFamily(
            "interceptor_kube_watch_errors",
            "Failed lists or watches (each followed by a backoff)",
            value=st.errors,
        )


class MapCollector(Collector):
    """Sizes of the service map."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "interceptor_service_map_objects", "Objects in the service map by kind", labels=["kind"]
        )
        stats = self.stats()
        for kind in ("namespaces", "services", "endpointslices", "pods", "serviceentries"):
            g.add_metric([kind], float(stats[kind]))
        yield g
        yield GaugeMetricFamily(
            "interceptor_service_map_answers",
            "Precomputed answers in the hot-path table",
            value=float(stats["answers"]),
        )


class CacheCollector(Collector):
    """The node cache: hits, misses, evictions, stale answers served, prefetches, size."""

    def __init__(
        self, cache: Callable[[], CacheStats | None], size: Callable[[], tuple[int, int]]
    ) -> None:
        self.cache = cache
        self.size = size

    def collect(self) -> Iterable[Metric]:
        st = self.cache()
        if st is None:
            return
        for name, value, doc in (
            ("hits", st.hits, "Forwarded questions answered from the cache"),
            ("misses", st.misses, "Forwarded questions not in the cache"),
            ("evictions", st.evictions, "Entries dropped to stay within the bounds"),
            (
                "stale_served",
                st.stale_served,
                "Expired answers served because every upstream failed (RFC 8767)",
            ),
            ("prefetches", st.prefetches, "Popular entries refreshed before expiry"),
        ):
            yield CounterMetricFamily(f"interceptor_cache_{name}", doc, value=value)
        entries, size = self.size()
        yield GaugeMetricFamily("interceptor_cache_entries", "Entries in the cache", value=entries)
        yield GaugeMetricFamily(
            "interceptor_cache_bytes", "Approximate bytes held by the cache", value=size
        )


def serve_metrics(listen: Endpoint, registry: CollectorRegistry) -> None:
    start_http_server(listen.port, addr=listen.host, registry=registry)


def _histogram(
    family: HistogramMetricFamily, labels: list[str], hist: tuple[list[int], float]
) -> None:
    counts, total = hist
    buckets: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        acc += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(acc)))
    family.add_metric(labels, buckets, total)


class RequestCollector(Collector):
    """What the resolver answered (both paths), how long it took, and autopath's outcomes,
    from the plain counters the resolver keeps (:mod:`interceptor.telemetry.stats`)."""

    def __init__(self, stats: Callable[[], RequestStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        st = self.stats()
        requests = CounterMetricFamily(
            "interceptor_requests",
            "Queries answered by the userspace resolver, by where the answer came from",
            labels=["proto", "qtype", "rcode", "source"],
        )
        for labels, n in sorted(st.totals().items()):
            requests.add_metric(list(labels), float(n))
        yield requests
        durations = HistogramMetricFamily(
            "interceptor_request_duration_seconds",
            "Time to answer a query, from its arrival to its reply (hot-path answers: the "
            "time of their receive batch divided by its queries)",
            labels=["source"],
        )
        for source in SOURCES:
            _histogram(durations, [source], st.durations[source].snapshot())
        yield durations
        autopath = CounterMetricFamily(
            "interceptor_autopath",
            "First search expansions completed on the server (hit) or left to the client (miss)",
            labels=["result"],
        )
        for result, n in sorted(st.autopath.copy().items()):
            autopath.add_metric([result], float(n))
        yield autopath
        tcp = CounterMetricFamily(
            "interceptor_tcp_connections_refused",
            "TCP connections closed at accept (client_limit: the client holds its share; "
            "limit: no room) or to make room for a client holding fewer (evicted)",
            labels=["reason"],
        )
        for reason in ("client_limit", "limit", "evicted"):
            tcp.add_metric([reason], float(st.tcp_refused.get(reason, 0)))
        yield tcp
        dropped = CounterMetricFamily(
            "interceptor_client_queue_dropped",
            "Queries the resolver dropped unstarted (the others are served in turn): full, "
            "their client had too many waiting (it sends faster than it is answered); "
            "expired, one waited longer than its client waits for an answer",
            labels=["reason"],
        )
        for reason in ("full", "expired"):
            dropped.add_metric([reason], float(st.client_dropped.get(reason, 0)))
        yield dropped
        yield CounterMetricFamily(
            "interceptor_forward_not_allowed",
            "Queries refused instead of forwarded: the server the pod asked is not an allowed "
            "forwarding target (--capture-all)",
            value=float(st.not_allowed),
        )


class UpstreamCollector(Collector):
    """Attempts per upstream server by outcome, their duration, and whether each is healthy."""

    def __init__(
        self, stats: Callable[[], UpstreamStats], healthy: Callable[[], dict[str, bool]]
    ) -> None:
        self.stats = stats
        self.healthy = healthy

    def collect(self) -> Iterable[Metric]:
        st = self.stats()
        attempts = CounterMetricFamily(
            "interceptor_upstream_requests",
            "Attempts sent to upstream servers by outcome (truncated: a UDP answer with TC, "
            "asked again over TCP)",
            labels=["server", "outcome"],
        )
        for (server, outcome), n in sorted(st.attempts.copy().items()):
            attempts.add_metric([server, outcome], float(n))
        yield attempts
        durations = HistogramMetricFamily(
            "interceptor_upstream_duration_seconds",
            "Duration of one upstream attempt, up to its timeout",
            labels=["server"],
        )
        for server, hist in sorted(st.durations.copy().items()):
            _histogram(durations, [server], hist.snapshot())
        yield durations
        connects = CounterMetricFamily(
            "interceptor_upstream_tcp_connections",
            "TCP connections opened to upstream servers (pooled and reused)",
            labels=["server"],
        )
        for server, n in sorted(st.tcp_connects.copy().items()):
            connects.add_metric([server], float(n))
        yield connects
        healthy = GaugeMetricFamily(
            "interceptor_upstream_healthy",
            "1 while an upstream server is used; 0 while it is skipped after failing",
            labels=["server"],
        )
        for server, up in sorted(self.healthy().items()):
            healthy.add_metric([server], 1.0 if up else 0.0)
        yield healthy


class BuildCollector(Collector):
    """``interceptor_build_info{version}``: always 1, for joining versions onto other series."""

    def __init__(self, version: str) -> None:
        self.version = version

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "interceptor_build_info", "The running interceptor's version", labels=["version"]
        )
        g.add_metric([self.version], 1.0)
        yield g

"""Prometheus metrics (prometheus-client), exported on ``--metrics-address``.

Collectors read state at scrape time and take what they read as constructor arguments, so
tests hand them fakes (client_python's ProcessCollector pattern)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interceptor.cache import CacheStats
from interceptor.settings import Endpoint
from interceptor.sources.kube import SyncState


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

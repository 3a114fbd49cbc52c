"""Composition: builds the service map, its source, the resolver and the listeners from one
Settings object, and runs them until a signal says stop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import signal
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from prometheus_client import CollectorRegistry

from interceptor import __version__
from interceptor.errors import ConfigError
from interceptor.model.gate import SyncGate
from interceptor.model.servicemap import ServiceMap
from interceptor.node.health import HealthServer, self_query
from interceptor.ops.admin import AdminServer
from interceptor.resolve.cache import Cache
from interceptor.resolve.listener import DnsServer
from interceptor.resolve.resolver import OriginalDestination, Resolver
from interceptor.resolve.upstream import Forwarder
from interceptor.settings import (
    Endpoint,
    KubeDnsConfig,
    PodRecords,
    Settings,
    load_kube_dns_config,
    resolv_conf_nameservers,
)
from interceptor.sources.kube import ClientApi, KubeSource
from interceptor.sources.yamlfile import FileSource
from interceptor.telemetry.prometheus import (
    BuildCollector,
    CacheCollector,
    MapCollector,
    RequestCollector,
    UpstreamCollector,
    WatchCollector,
    serve_metrics,
)

log = logging.getLogger(__name__)


def example_cluster() -> Path:
    """The bundled example cluster file."""
    return Path(str(importlib.resources.files("interceptor") / "example" / "cluster.yaml"))


class Feed:
    """What keeps the service map filled: the YAML file (ready at once) or the Kubernetes
    watch (ready after its first full sync; until then cluster names get SERVFAIL)."""

    def __init__(self, settings: Settings, smap: ServiceMap) -> None:
        self.settings = settings
        self.smap = smap
        self.kube: KubeSource | None = None
        self.file: FileSource | None = None
        self.synced = SyncGate(is_open=settings.kube is None)
        """Opened by the first full sync; the resolver reads it."""
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def origin(self) -> str:
        if self.settings.kube is not None:
            k = self.settings.kube
            return f"the Kubernetes API ({k.kubeconfig or 'in-cluster'})"
        return str(self.settings.source or example_cluster())

    async def start(self, resolver: Resolver) -> None:
        kube_dns = self.settings.upstream.kube_dns_config
        if kube_dns is not None:
            self._tasks.append(
                asyncio.ensure_future(
                    follow_kube_dns_config(resolver, kube_dns, self.settings.upstream.kube_dns)
                )
            )
        if self.settings.kube is None:
            self.file = FileSource(self.settings.source or example_cluster(), self.smap)
            self.file.load()
            self._log_loaded()
            self._tasks.append(asyncio.ensure_future(self.file.follow()))
            return
        k = self.settings.kube
        ClientApi(k.kubeconfig)  # fail fast, with a clear message, on a bad configuration
        api = partial(ClientApi, k.kubeconfig)
        all_pods = self.settings.zone.pod_records is PodRecords.VERIFIED
        self.kube = KubeSource(api, self.smap, k.node_name, all_pods, asyncio.get_running_loop())
        self.kube.start()
        self._tasks.append(asyncio.ensure_future(self._await_sync()))

    async def _await_sync(self) -> None:
        assert self.kube is not None and self.kube.state.first_sync is not None
        await self.kube.state.first_sync.wait()
        self.synced.open()
        self._log_loaded()

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: synced at least once; and whether the API is reachable right now."""
        if self.kube is None:
            return True, f"ready: serving {self.origin}"
        st = self.kube.state
        if not st.ready:
            waiting = ", ".join(sorted(st.required - st.synced))
            return False, f"not ready: waiting for the first sync of {waiting}"
        if not st.healthy:
            return True, (
                f"ready, degraded: the API server is unreachable ({st.last_error}); "
                "answering from the last known state"
            )
        return True, f"ready: {st.events} watch events, {st.relists} lists, {st.errors} errors"

    def _log_loaded(self) -> None:
        stats = self.smap.stats()
        log.info(
            "service map loaded from %s: %d services, %d endpoint slices, %d pods, "
            "%d mesh hosts, %d precomputed answers",
            self.origin,
            stats["services"],
            stats["endpointslices"],
            stats["pods"],
            stats["mesh_hosts"],
            stats["answers"],
        )

    async def stop(self) -> None:
        if self.kube is not None:
            self.kube.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def make_cache(settings: Settings) -> Cache | None:
    c = settings.cache
    if c.size <= 0:
        return None
    return Cache(max_entries=c.size, min_ttl=c.min_ttl, max_ttl=c.max_ttl, stale_for=c.stale_for)


async def follow_kube_dns_config(
    resolver: Resolver, path: Path, current: KubeDnsConfig | None, interval: float = 5.0
) -> None:
    """Re-read the kube-dns ConfigMap every ``interval`` seconds (a mounted ConfigMap
    volume is updated in place by kubelet) and apply a changed one; a broken edit is logged
    and the last good configuration stays."""
    while True:
        await asyncio.sleep(interval)
        try:
            new = load_kube_dns_config(path)
        except ConfigError as exc:
            log.error("kube-dns ConfigMap not applied, keeping the previous one: %s", exc)
            continue
        if new != current:
            resolver.reconfigure(new)
            current = new
            log.info(
                "kube-dns ConfigMap applied: %d stub domain(s), upstream %s",
                len(new.zones),
                ", ".join(map(str, new.servers)) or "unchanged",
            )


def make_resolver(
    settings: Settings,
    feed: Feed,
    upstreams: Sequence[Endpoint],
    original_destination: OriginalDestination | None = None,
) -> Resolver:
    """The resolver ``serve`` and the agent both run: the forwarder, the node cache, and the
    source's sync gate."""
    return Resolver(
        feed.smap,
        Forwarder(settings.upstream),
        settings,
        upstreams,
        original_destination=original_destination,
        cache=make_cache(settings),
        synced=feed.synced,
    )


def start_metrics(settings: Settings, feed: Feed, resolver: Resolver) -> CollectorRegistry | None:
    """The Prometheus endpoint, if configured, with the collectors of this process."""
    if settings.metrics is None:
        return None
    registry = CollectorRegistry()
    registry.register(WatchCollector(lambda: feed.kube.state if feed.kube else None))
    registry.register(MapCollector(feed.smap.stats))
    cache = resolver.cache
    registry.register(
        CacheCollector(
            lambda: cache.stats if cache is not None else None,
            lambda: (len(cache.entries), cache.bytes) if cache is not None else (0, 0),
        )
    )
    registry.register(RequestCollector(lambda: resolver.stats))
    forwarder = resolver.forwarder
    registry.register(UpstreamCollector(lambda: forwarder.stats, forwarder.healthy))
    registry.register(BuildCollector(__version__))
    serve_metrics(settings.metrics, registry)
    log.info("metrics on http://%s/metrics", settings.metrics)
    return registry


async def serve(
    settings: Settings, ready: asyncio.Event | None = None, admin_socket: Path | None = None
) -> None:
    """Run ``interceptor serve`` until SIGTERM or SIGINT; each resource is entered on one
    exit stack where it is set up, so it is torn down in reverse."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        # Signals first: a supervisor may stop us as soon as we say we are serving.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        feed = Feed(settings, ServiceMap(settings.zone))
        upstreams = settings.upstream.servers or resolv_conf_nameservers(settings.resolv_conf)
        resolver = make_resolver(settings, feed, upstreams)
        stack.callback(resolver.forwarder.close)
        await feed.start(resolver)
        stack.push_async_callback(feed.stop)
        start_metrics(settings, feed, resolver)
        server = DnsServer(resolver, settings.server)
        await server.start()
        stack.push_async_callback(server.close)
        host, port = server.address
        listening = Endpoint(host, port)
        if settings.health:
            health = HealthServer(
                settings.health,
                feed.readiness,
                lambda: self_query(listening, settings.zone.cluster_domain),
            )
            await health.start()
            stack.push_async_callback(health.close)
        if admin_socket is not None:
            status = lambda: {"pid": os.getpid(), "ready": feed.synced.is_open}  # noqa: E731
            admin = AdminServer(admin_socket, resolver, status)
            await admin.start()
            stack.push_async_callback(admin.close)
        log.info(
            "serving DNS on %s port %d (UDP and TCP) for zone %s; forwarding other names to %s",
            host,
            port,
            feed.smap.zone,
            ", ".join(map(str, resolver.default_servers or upstreams)) or "nowhere",
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")

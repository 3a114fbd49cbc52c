"""Composition: builds the service map, its source, the resolver and the listeners from one
Settings object, and runs them until a signal says stop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import signal
from pathlib import Path

from interceptor.model.servicemap import ServiceMap
from interceptor.resolver import Resolver
from interceptor.server import DnsServer
from interceptor.settings import Settings, resolv_conf_nameservers
from interceptor.sources.yamlfile import FileSource
from interceptor.upstream import Forwarder

log = logging.getLogger(__name__)


def example_cluster() -> Path:
    """The bundled example cluster file."""
    return Path(str(importlib.resources.files("interceptor") / "example" / "cluster.yaml"))


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run ``interceptor serve`` until SIGTERM or SIGINT."""
    smap = ServiceMap(settings.zone)
    source = FileSource(settings.source or example_cluster(), smap)
    source.load()
    stats = smap.stats()
    log.info(
        "service map loaded from %s: %d services, %d endpoint slices, %d pods, "
        "%d mesh hosts, %d precomputed answers",
        source.path,
        stats["services"],
        stats["endpointslices"],
        stats["pods"],
        stats["mesh_hosts"],
        stats["answers"],
    )
    upstreams = settings.upstream.servers or resolv_conf_nameservers()
    resolver = Resolver(smap, Forwarder(settings.upstream), settings, upstreams)
    server = DnsServer(resolver, settings.server)
    await server.start()
    host, port = server.address
    log.info(
        "serving DNS on %s port %d (UDP and TCP) for zone %s; forwarding other names to %s",
        host,
        port,
        smap.zone,
        ", ".join(map(str, upstreams)) or "nowhere",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = asyncio.ensure_future(source.follow())
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

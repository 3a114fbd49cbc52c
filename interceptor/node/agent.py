"""``interceptor agent``: the node agent.  Runs in the node's network namespace, serves the
resolver on a node-local address, attaches the BPF programs to this node's pod veths and
keeps them in step with the pods, and beats the heartbeat that keeps the datapath engaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from interceptor import __version__
from interceptor.datapath.addresses import AddressBook
from interceptor.datapath.answers import AnswerMap, CachedAnswers, JunkAnswers, ViewAnswers
from interceptor.datapath.discovery import LinkFinder, NetlinkEvents
from interceptor.datapath.loader import Datapath
from interceptor.model.nodepods import NodePod, node_pod_ips, node_pods
from interceptor.model.servicemap import ServiceMap
from interceptor.node.health import HealthServer, self_query
from interceptor.node.kernelcache import KernelCacheMirror
from interceptor.node.lifecycle import OwnerWatch, StopMode
from interceptor.node.meshviews import MeshViews
from interceptor.node.runtime import Feed, make_resolver, start_metrics
from interceptor.ops.agentops import AgentOps
from interceptor.resolve.listener import DnsServer
from interceptor.resolve.resolver import Resolver
from interceptor.settings import ADDRESS_BOOK, AgentSettings, Endpoint, Settings

log = logging.getLogger(__name__)


class _StopTimer:
    """Times each step of a stop: kubelet kills us when its grace period ends, so the log
    says how long each step took, and names a slow one as it happens."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.steps: list[str] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        if not self.steps:
            self.t0 = t0
        try:
            yield
        finally:
            took = time.monotonic() - t0
            self.steps.append(f"{name} {took:.2f}s")
            if took > 1:
                log.warning("stop: %s took %.2fs", name, took)

    def timed(
        self, name: str, fn: Callable[..., Awaitable[object]], *args: object
    ) -> Callable[[], Awaitable[None]]:
        """``fn(*args)`` as a timed stop step, for an exit stack."""

        async def step() -> None:
            with self.step(name):
                await fn(*args)

        return step

    def sync(self, name: str, fn: Callable[..., object], *args: object) -> Callable[[], None]:
        def step() -> None:
            with self.step(name):
                fn(*args)

        return step

    def done(self) -> None:
        if self.steps:  # the clock starts with the first step of the stop
            log.info("stopped in %.2fs: %s", time.monotonic() - self.t0, ", ".join(self.steps))


T = TypeVar("T")

HEARTBEAT_INTERVAL = 0.2


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()


class Agent:
    def __init__(self, settings: Settings, agent: AgentSettings) -> None:
        self.settings = settings
        self.agent = agent
        self.smap = ServiceMap(settings.zone)
        self.feed = Feed(settings, self.smap)
        self.datapath = Datapath(agent.datapath)
        self._owner: OwnerWatch | None = None
        self._mode: StopMode | None = None
        self._kick = asyncio.Event()
        self._last_desired: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._last_views: dict[str, int] = {}
        self.views = MeshViews(self.smap, None)
        """Namespaces' views of the mesh in the kernel (given FP_ANSWERS at fast-path start)."""
        self._last_names: set[tuple[str, str, tuple[str, ...]]] = set()
        self._nl_thread = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._programs_ready = False
        self._servers: list[DnsServer] = []
        """The DNS servers (one per resolver address): their TCP counts correct the kernel's."""
        self._first_seen: dict[tuple[int, str], float] = {}
        """(veth, address) routes seen: when first seen while the API had not reported the
        address, -inf once it had (no early capture for it any more)."""
        dp = agent.datapath
        self.ops = AgentOps(
            agent.state_dir,
            agent.admin_socket,
            AgentOps.info(
                agent.node_name,
                __version__,
                dp.pin_dir,
                agent.admin_socket,
                agent.resolver_addresses,
                agent.captures,
                dp.tc_prio,
                dp.tc_handle,
            ),
        )

    def desired(
        self, pods: list[NodePod], finder: LinkFinder, known: set[str] | None = None
    ) -> dict[int, tuple[str, tuple[str, ...]]]:
        """ifindex -> (name, pod IPs) for this node's capturable pods.

        ``known`` (every pod address of this node the API has reported): a veth the kernel
        routes an address to that the API has not reported yet is a pod whose sandbox was
        just made, and is captured at once, before its containers ask anything.  Once the
        API reports the pod, the usual rules decide (a DNS server or an opted-out pod is let
        go).  Not with --capture-all, where a new DNS server's own upstream queries could be
        caught before the API says what it is."""
        allowed = None
        if self.agent.interfaces:
            allowed = {ln.ifindex for ln in finder.matching(self.agent.interfaces)}
        out: dict[int, tuple[str, list[str]]] = {}
        for pod in pods:
            for ip in pod.ips:
                link = finder.host_veth(ip)
                if link is None or (allowed is not None and link.ifindex not in allowed):
                    continue
                out.setdefault(link.ifindex, (link.name, []))[1].append(ip)
        if known is not None and self.agent.early_capture > 0 and not self.agent.capture_all:
            now = time.monotonic()
            routed = finder.routed_veths()
            seen = self._first_seen
            for gone in set(seen) - {(link.ifindex, ip) for link, ip in routed}:
                del seen[gone]
            for link, ip in routed:
                key = (link.ifindex, ip)
                if ip in known:
                    # The API has spoken for this veth and address: once it no longer lists
                    # the pod (deleted, its veth not yet gone) the API's word stands.
                    seen[key] = -math.inf
                    continue
                # Only for a while: an address the API never claims (not a pod, or a pod of
                # another node's range) is left alone after that.
                if now - seen.setdefault(key, now) > self.agent.early_capture:
                    continue
                if link.ifindex in out or (allowed is not None and link.ifindex not in allowed):
                    continue
                out.setdefault(link.ifindex, (link.name, []))[1].append(ip)
        return {k: (name, tuple(sorted(ips))) for k, (name, ips) in sorted(out.items())}

    def _apply(
        self, pods: list[NodePod], finder: LinkFinder, known: set[str], views: dict[str, int]
    ) -> None:
        """On the netlink thread: find the veths and bring the datapath in step."""
        desired = self.desired(pods, finder, known)
        names = {(p.namespace, p.name, p.ips) for p in pods}
        if desired != self._last_desired or views != self._last_views:
            with self.ops.programming(pods, self.datapath.attached):
                self.datapath.reconcile(desired, views)
            self._last_desired = desired
            self._last_views = views
            log.info(
                "capturing DNS of %d pod address(es) on %d veth(s)",
                sum(len(ips) for _, ips in desired.values()),
                len(desired),
            )
        elif names != self._last_names:
            # Same veths, but the API has named a pod captured early: the state file (and so
            # the per-pod metrics and the inspection verbs) must say whose it is.
            self.ops.publish(pods, self.datapath.attached)
        self._last_names = names

    def _all_found(self) -> bool:
        pods, _ = node_pods(self.smap, self.agent.node_name)
        found = {ip for _, ips in self._last_desired.values() for ip in ips}
        return all(ip in found for pod in pods for ip in pod.ips)

    async def reconcile(self, finder: LinkFinder) -> None:
        # The service map is only touched on the loop thread; the netlink thread gets a copy.
        pods, _ = node_pods(self.smap, self.agent.node_name)
        known = node_pod_ips(self.smap, self.agent.node_name)
        views = self.views.views_for(pods)
        await self._netlink(self._apply, pods, finder, known, views)
        # After the PODS entries: a pod whose view has no entries yet is the resolver's.
        self.views.sync()
        live: Counter[str] = Counter()
        for server in self._servers:
            if server.tcp is not None:
                live.update(server.tcp.per_client)
        await self._netlink(self.datapath.correct_tcp_counts, live)

    async def _netlink(self, fn: Callable[..., T], *args: object) -> T:
        """Run a netlink/bcc operation on the agent's one netlink thread: pyroute2's sync API
        cannot run inside the event loop's thread, and one thread keeps them in order."""
        return await asyncio.get_running_loop().run_in_executor(self._nl_thread, fn, *args)

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT.

        Every resource is entered on one exit stack right where it is set up, so the teardown
        order is the structure: in reverse.  The programs let go of the veths first (the
        kernel fails open, or keeps answering for a successor), then the admin and health
        endpoints, the sockets and the resolver addresses, the owner watch, the source, and
        last the maps (removed only when the agent is being uninstalled).
        """
        a = self.agent
        loop = self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        timer = _StopTimer()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(timer.done)
            stack.callback(self._nl_thread.shutdown)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
                stack.callback(loop.remove_signal_handler, sig)

            await self._netlink(self.datapath.load)
            stack.push_async_callback(timer.timed("close", self._netlink, self.datapath.close))
            stack.push_async_callback(timer.timed("uninstall", self._remove_if_uninstalled))
            self.ops.publish([], self.datapath.attached)

            resolver = make_resolver(
                self.settings,
                self.feed,
                upstreams=self.settings.upstream.servers
                or tuple(Endpoint(ip, 53) for ip in a.captures),
                original_destination=self.datapath.original_destination,
            )
            await self.feed.start(resolver)
            stack.push_async_callback(timer.timed("feed", self.feed.stop))
            self._owner = self._watch_owner()
            if self._owner is not None:
                stack.callback(timer.sync("owner", self._owner.stop))

            registry = start_metrics(self.settings, self.feed, resolver)
            self.ops.register_metrics(registry, a.datapath.pin_dir)
            # Sockets first, then the heartbeat, then the programs: a packet steered to us
            # always finds a listener.
            book = AddressBook(a.state_dir / ADDRESS_BOOK)
            for ip in a.resolver_addresses:
                if await self._netlink(book.claim, a.resolver_device, ip):
                    stack.push_async_callback(
                        timer.timed(
                            f"address {ip}", self._netlink, book.release, a.resolver_device, ip
                        )
                    )
                server = DnsServer(
                    resolver,
                    dataclasses.replace(self.settings.server, listen=Endpoint(ip, 53)),
                )
                await server.start()
                self._servers.append(server)
                stack.push_async_callback(timer.timed(f"server {ip}", server.close))
            if self.settings.health is not None:
                health = HealthServer(self.settings.health, self.readiness, self._alive)
                await health.start()
                stack.push_async_callback(timer.timed("health", health.close))
            await self.ops.start_admin(resolver, self.status)
            stack.push_async_callback(timer.timed("admin", self.ops.close))

            self.datapath.configure(a.resolver_addresses, a.captures, a.capture_all)
            if not self.feed.synced.is_open:
                log.info(
                    "waiting for the first full sync from %s before capturing", self.feed.origin
                )
                assert self.feed.kube is not None and self.feed.kube.state.first_sync
                await _first(self.feed.kube.state.first_sync.wait(), stop.wait())
                if stop.is_set():
                    return
            self._start_fastpath()
            mirror = self._start_kernel_cache(resolver)
            finder = await self._netlink(LinkFinder.open)
            stack.push_async_callback(timer.timed("links", self._netlink, finder.ipr.close))
            stack.push_async_callback(timer.timed("programs", self._let_go))
            await self.reconcile(finder)
            for _ in range(10):  # bridge pods may need a neighbour resolution first
                if self._all_found():
                    break
                await asyncio.sleep(0.1)
                await self.reconcile(finder)
            self._programs_ready = True
            events = NetlinkEvents(self._kick_from_thread)
            events.start()
            stack.callback(timer.sync("netlink events", events.close))
            jobs = [self._heartbeat(), self._reconcile_loop(finder)]
            if mirror is not None:
                jobs.append(mirror.run())
            for job in jobs:
                stack.push_async_callback(timer.timed("tasks", _cancel, asyncio.ensure_future(job)))
            log.info(
                "agent ready on node %s: resolver %s on %s, capturing %s",
                a.node_name,
                ", ".join(a.resolver_addresses),
                a.resolver_device,
                "all port-53 traffic" if a.capture_all else ", ".join(a.captures),
            )
            await stop.wait()
            log.info("stopping: detaching from %d veth(s)", len(self.datapath.attached))

    def _stop_mode(self) -> StopMode:
        """Why we stop, asked once (the owner watch knows whether a successor is coming)."""
        if self._mode is None:
            self._mode = self._owner.mode() if self._owner is not None else StopMode.DETACH
            log.info("stop: %s", self._mode.value)
        return self._mode

    async def _let_go(self) -> None:
        """The programs leave the veths, or stay answering for a successor (a handover)."""
        if self._stop_mode() is StopMode.HANDOVER and self._programs_ready:
            await self._netlink(self.datapath.hand_over, self.agent.handover_grace)
        else:
            await self._netlink(self.datapath.detach_all)

    async def _remove_if_uninstalled(self) -> None:
        """The DaemonSet is gone: nothing will ever read the pins or the state file again."""
        if self._stop_mode() is StopMode.UNINSTALL:
            await self._netlink(self.datapath.remove_pins)
            self.ops.remove_state()

    def _watch_owner(self) -> OwnerWatch | None:
        """Follow this pod's DaemonSet, so a stop knows whether a successor is coming."""
        a = self.agent
        kube = self.settings.kube
        if not (a.handover_grace > 0 and a.pod_name and a.pod_namespace and kube is not None):
            return None
        from functools import partial

        from interceptor.sources.kube import ClientApi

        owner = OwnerWatch(partial(ClientApi, kube.kubeconfig), a.pod_namespace, a.pod_name)
        owner.start()
        return owner

    def _start_fastpath(self) -> None:
        """Fill the kernel's answer map from the synced service map, then keep it in step
        event by event (on the loop thread, right after the map itself changed)."""
        pinned = self.datapath.maps.get("FP_ANSWERS")
        if pinned is None:
            return
        capacity = self.agent.datapath.fastpath_entries
        answers = AnswerMap(pinned, capacity)
        t0 = time.monotonic()
        smap = self.smap
        junk = JunkAnswers(
            self.datapath.maps["FP_OWNERS"],
            self.datapath.maps["FP_JUNK"],
            smap.zone,
            smap.nxdomain,
            capacity,
        )
        # With autopath, the first expansion of a search list is answered per pod (a CNAME
        # to what exists), so junk is the resolver's; without, it is the same for everyone.
        names = junk.load(smap.existing_names(), not self.settings.autopath.enabled)
        n = answers.load(smap.answers)
        self.views = MeshViews(smap, ViewAnswers(answers))
        log.info(
            "fast path: %d answers and %d names loaded into the kernel in %.2fs (search-path "
            "junk answered %s)",
            n,
            names,
            time.monotonic() - t0,
            "in the kernel" if junk.on else "by the resolver",
        )
        smap.subscribe_names(lambda changed: junk.apply(changed, smap.exists))
        smap.subscribe(lambda changed: answers.apply(smap.answers, changed))

    def _start_kernel_cache(self, resolver: Resolver) -> KernelCacheMirror | None:
        """Hand the cache's hot names to the kernel (FP_CACHE), unless there is no cache,
        no fast path, or --fastpath-cached 0."""
        pinned = self.datapath.maps.get("FP_CACHE")
        d = self.agent.datapath
        if pinned is None or resolver.cache is None or d.fastpath_cached == 0:
            return None
        return KernelCacheMirror(
            resolver,
            resolver.cache,
            self.smap,
            CachedAnswers(pinned, d.fastpath_cached),
            self.datapath.cached_by_server,
            d.fastpath_cached_hits,
        )

    async def _alive(self) -> tuple[bool, str]:
        """/healthz: the resolver answers a real query on its own address."""
        where = Endpoint(self.agent.resolver_addresses[0], 53)
        return await self_query(where, self.settings.zone.cluster_domain)

    def status(self) -> dict[str, object]:
        """For ``interceptor`` verbs over the admin socket."""
        ready, why = self.readiness()
        return {
            "pid": os.getpid(),
            "node": self.agent.node_name,
            "version": __version__,
            "ready": ready,
            "readiness": why,
            "interfaces": len(self.datapath.attached),
            "pod_addresses": sum(len(a.pods) for a in self.datapath.attached.values()),
        }

    def readiness(self) -> tuple[bool, str]:
        ok, why = self.feed.readiness()
        if not ok:
            return ok, why
        if not self._programs_ready:
            return False, "not ready: BPF programs not attached yet"
        return True, f"{why}; capturing on {len(self.datapath.attached)} veth(s)"

    def _kick_from_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._kick.set)

    async def _heartbeat(self) -> None:
        while True:
            self.datapath.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _reconcile_loop(self, finder: LinkFinder) -> None:
        seen = self.smap.generation
        deadline = asyncio.get_running_loop().time() + self.agent.resync_interval
        while True:
            # Wake on a netlink event, on a change of the service map (a pod came or went),
            # or on the periodic full pass.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), 0.25)
            now = asyncio.get_running_loop().time()
            if not self._kick.is_set() and self.smap.generation == seen and now < deadline:
                continue
            seen = self.smap.generation
            deadline = now + self.agent.resync_interval
            self._kick.clear()
            await asyncio.sleep(0.05)  # let a burst of netlink events settle
            self._kick.clear()
            try:
                await self.reconcile(finder)
            except Exception as exc:  # keep serving; the next pass retries
                log.warning("reconcile failed: %s", exc)

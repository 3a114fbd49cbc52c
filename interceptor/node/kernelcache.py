"""Hot names of the resolver's cache, handed to the kernel to answer (FP_CACHE).

The cache offers an entry once the resolver has served it ``--fastpath-cached-hits`` times
(:attr:`Cache.promotions`); a few times a second the agent hands the offered entries that
the kernel can answer exactly as the resolver would to :class:`CachedAnswers`.  The kernel
answers each until the last tenth of its life, with every TTL counted down as the resolver
counts it; then the resolver sees the name again, refreshes it if it is popular (prefetch),
and the fresh copy goes down in its place.

What the kernel holds is forgotten at once when the mesh hosts change (a forwarded name may
be a mesh host now) and when the routes change (a ConfigMap's upstreamNameservers): the
resolver decides those names again, and the hot ones come back down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from interceptor.datapath.answers import CachedAnswers, CachedReply
from interceptor.datapath.maps import FP_CK_CD, FP_CK_EDNS
from interceptor.dns import wire
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.cache import Cache, Entry
from interceptor.resolve.caching import KEY_CD, KEY_DO, KEY_EDNS, key_parts
from interceptor.resolve.resolver import Resolver

log = logging.getLogger(__name__)

MIRROR_INTERVAL = 0.25
"""Seconds between turns: how soon a name that became hot is answered in the kernel."""
PUSH_PER_TURN = 1024
"""Entries handed down per turn at most: a burst of new names costs bounded agent time."""

_KERNEL_TYPES = frozenset((wire.A, wire.AAAA))


class KernelCacheMirror:
    def __init__(
        self,
        resolver: Resolver,
        cache: Cache,
        smap: ServiceMap,
        answers: CachedAnswers,
        by_server: Callable[[bool], None],
        promote_hits: int,
    ) -> None:
        self.resolver = resolver
        self.cache = cache
        self.smap = smap
        self.answers = answers
        self.by_server = by_server
        """Sets the kernel's CFG_CACHED_BY_SERVER."""
        self._routes = resolver.routes_generation
        self._mesh = smap.mesh_generation
        answers.flush()  # a previous agent's entries were for its routes
        by_server(resolver.routes_by_server)
        cache.promote_hits = promote_hits
        smap.subscribe_mesh(self._mesh_changed)  # at once: no stale forwarded answer

    def _mesh_changed(self) -> None:
        try:
            self.forget()
        except Exception as exc:  # never into the service map's event: it must go on
            log.warning("taking cached names back from the kernel failed: %s", exc)

    def forget(self) -> None:
        """Take every cached answer out of the kernel; hot ones are offered again."""
        self.answers.flush()
        self._mesh = self.smap.mesh_generation
        for entry in self.cache.entries.values():
            entry.offered = False
        self.cache.promotions.clear()

    def turn(self, now: float | None = None) -> int:
        """One pass: follow a route change, sweep what expired, hand down what was offered.
        Returns the number of entries handed down."""
        resolver = self.resolver
        if resolver.routes_generation != self._routes:
            self.forget()
            self._routes = resolver.routes_generation
            self.by_server(resolver.routes_by_server)
        now = time.monotonic() if now is None else now
        self.answers.sweep(now)
        offered = self.cache.promotions
        pushed = 0
        for key in list(offered)[:PUSH_PER_TURN]:
            del offered[key]
            entry = self.cache.entries.get(key)
            if entry is None:
                continue
            entry.offered = True
            reply = self._reply(key, entry, now)
            if reply is None:
                continue
            outcome = self.answers.put(reply)
            if outcome == "pushed":
                pushed += 1
            elif outcome == "full":
                entry.offered = False  # offered again when hit again, for when room is made
        return pushed

    def _reply(self, key: bytes, entry: Entry, now: float) -> CachedReply | None:
        """The entry as the kernel would answer it, if the hot path would answer it now."""
        if entry.checked != self.smap.mesh_generation or entry.prefetching:
            return None
        due = entry.due
        if now >= due:
            return None
        parts = key_parts(key)
        if parts is None:
            return None
        # The kernel leaves DO queries to the resolver: such entries never go down.
        if parts.qtype not in _KERNEL_TYPES or parts.qclass != wire.CLASS_IN:
            return None
        if parts.flags & KEY_DO:
            return None
        if self.smap.mesh_scoped_wire(parts.name):
            return None  # forwarded for this client, a mesh host for another namespace's
        server = self.resolver.kernel_route(parts.name, parts.servers)
        if server is None:
            return None
        return CachedReply(
            name=parts.name,
            qtype=parts.qtype,
            flags=(FP_CK_EDNS if parts.flags & KEY_EDNS else 0)
            | (FP_CK_CD if parts.flags & KEY_CD else 0),
            server=server,
            message=entry.message,
            ttl_offsets=entry.ttl_offsets,
            ttls=entry.ttls,
            stored=entry.stored,
            expires=entry.expires,
            due=due,
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(MIRROR_INTERVAL)
            try:
                self.turn()
            except Exception as exc:  # keep serving: the resolver answers these names
                log.warning("handing cached names to the kernel failed: %s", exc)

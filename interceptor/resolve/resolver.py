"""The decision for one query: authoritative answer, mesh VIP, search-path junk, or forward.

The resolver never touches sockets.  :meth:`Resolver.fast` is the hot path (table hit, bytes
in, bytes out); :meth:`Resolver.decide` is the careful path for everything else, and reports
which rule answered (:mod:`interceptor.resolve.decision`).  What a decision uses lives
beside it: :mod:`~interceptor.resolve.autopath` completes search lists,
:mod:`~interceptor.resolve.caching` forwards through the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from interceptor.dns import wire
from interceptor.dns.message import (
    Answer,
    Malformed,
    Query,
    assemble,
    badvers_response,
    build_query,
    error_response,
    fast_response,
    parse_query,
    question_end,
    udp_limit,
)
from interceptor.dns.records import sections
from interceptor.logutil import RateLimitedLog
from interceptor.model.gate import SyncGate
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.autopath import Autopath
from interceptor.resolve.cache import Cache, Entry
from interceptor.resolve.caching import CachingForwarder, servers_key
from interceptor.resolve.decision import Client, Decision, Rule
from interceptor.resolve.upstream import Upstream, UpstreamFailed
from interceptor.settings import Endpoint, KubeDnsConfig, PodRecords, Settings, forwarding
from interceptor.telemetry.stats import RequestStats

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

MAX_CNAME_CHAIN = 8

OriginalDestination = Callable[[str, int, bool], str | None]
"""(client address, client port, tcp) -> the server address the client's packet was for."""

ARPA_TAIL = b"\x04arpa\x00"

AUTHORITATIVE, MESH, CACHE = 0, 1, 2
"""What answered a hot-path query, for the counters."""

FROM_THE_MAP = frozenset(
    (Rule.TABLE, Rule.POD_RECORD, Rule.EMPTY_NON_TERMINAL, Rule.NXDOMAIN, Rule.MESH_WILDCARD)
)
"""Careful-path answers that depend on nothing but the query and the service map (without
autopath, whose answers depend on the client's namespace, and but for mesh hosts whose
answer does too, :meth:`ServiceMap.mesh_scoped`): the hot path may remember them."""

MEMO_MAX = 65536
"""Finished hot-path replies remembered (distinct queries: case and EDNS size count)."""

Memo = tuple[bytes, int, float, bytes, int, bytes | None, bytes, "Entry | None"]
"""A finished hot-path reply, keyed by the query's bytes after its ID: (the reply after its
ID, the service map generation it was made at (any change forgets it), valid until (cached
answers: a TTL ticks over or the entry's last tenth begins), counter key, what answered, the
route a cached answer is for when that depends on the client, its cache key and entry)."""


class Route(NamedTuple):
    """Where a forwarded name goes, and why."""

    servers: Sequence[Endpoint]
    via: str
    """The flag or ConfigMap entry that chose ``servers``, for ``interceptor query``."""
    allowed: bool = True
    """False: the server the pod asked is not an allowed forwarding target (no servers)."""


class Resolver:
    def __init__(
        self,
        smap: ServiceMap,
        forwarder: Upstream,
        settings: Settings,
        upstreams: Sequence[Endpoint],
        original_destination: OriginalDestination | None = None,
        cache: Cache | None = None,
        synced: SyncGate | None = None,
    ) -> None:
        self.smap = smap
        self.forwarder = forwarder
        self.settings = settings
        self.upstreams = tuple(upstreams)
        """Used when no override is set and the server the client asked is not known."""
        self.original_destination = original_destination
        self.max_udp = settings.server.max_udp_size
        self.caching = CachingForwarder(forwarder, cache, self.max_udp, settings.cache.stale_after)
        # What the memo's hits read, bound once (see fast()).
        self._cache = cache if cache is not None else Cache(max_entries=0)
        self._clock = self._cache.clock
        self._zones: list[tuple[str, tuple[Endpoint, ...]]] = []
        self._servers: tuple[Endpoint, ...] = ()
        self.routes_generation = 0
        """Counts route changes (:meth:`reconfigure`): cached answers the kernel holds were
        keyed by the old routes."""
        self.reconfigure(settings.upstream.kube_dns)
        self.synced = synced if synced is not None else SyncGate()
        self.stats = RequestStats()
        self._fast_mesh = 0
        """Hot-path mesh answers since the listener last reported its batch timing."""
        self._fast_cache = 0
        """Hot-path cached answers, likewise."""
        self._fast_counts = self.stats.fast
        self._zone_tail = smap.zone_wire
        self._zone_tail_start = 1 - len(smap.zone_wire)
        self.autopath = (
            Autopath(smap, settings.autopath.node_search, self._candidate, self.stats, self.max_udp)
            if settings.autopath.enabled
            else None
        )

    @property
    def cache(self) -> Cache | None:
        return self.caching.cache

    def reconfigure(self, kube_dns: KubeDnsConfig | None) -> None:
        """Per-zone and default servers from the flags and a kube-dns ConfigMap (also when
        the ConfigMap changes while we run)."""
        zones, servers = forwarding(self.settings.upstream, kube_dns)
        self._zones = sorted(zones, key=lambda z: -len(z[0]))
        self._zone_wires = tuple(wire.encode_name(z) for z, _ in self._zones)
        self._servers = servers
        self._servers_key = servers_key(servers) if servers else None
        self._upstreams_key = servers_key(self.upstreams)
        self._asked_keys: dict[str, bytes] = {}
        """The server a pod asked -> its cache-key tail (allowed servers only)."""
        self._memo: dict[bytes, Memo] = {}
        """Finished hot-path replies (see :data:`Memo`): forgotten when the routes change."""
        self.routes_generation += 1
        self._allowed = frozenset(
            [e.host for e in self.upstreams]
            + [e.host for e in servers]
            + [e.host for _, zs in zones for e in zs]
            + list(self.settings.upstream.allow)
        )
        """Where a pod's query may be forwarded: the captured servers, the upstreams, the
        ConfigMap's and --allow-forward's."""

    @property
    def default_servers(self) -> tuple[Endpoint, ...]:
        """``--upstream`` or the ConfigMap's upstreamNameservers; () means the server each
        pod asked (or :attr:`upstreams`)."""
        return self._servers

    def route(self, client: Client | None, tcp: bool, qname: str = "") -> Route:
        """The servers a forwarded name goes to, and why: ``--forward`` for the longest
        matching zone (stubDomains); else ``--upstream`` (or the ConfigMap's
        upstreamNameservers); else the server the pod asked (its packet's original
        destination, so the pod's choice of server is respected); else the defaults."""
        for zone, servers in self._zones:
            if qname == zone or qname.endswith("." + zone):
                return Route(servers, f"the servers of zone {zone} (--forward, stubDomains)")
        if self._servers:
            return Route(self._servers, "--upstream (or upstreamNameservers)")
        if client is not None and self.original_destination is not None:
            orig = self.original_destination(client[0], client[1], tcp)
            if orig is not None:
                if orig not in self._allowed:
                    return Route((), f"{orig} is not an allowed forwarding target", False)
                return Route(
                    (Endpoint(orig, 53),),
                    "the server the pod asked (its flow's original destination)",
                )
            return Route(
                self.upstreams, "the captured servers (no live flow says which the pod asked)"
            )
        return Route(self.upstreams, "the default upstream servers")

    def fast(self, data: bytes, client: Client | None = None) -> bytes | None:
        """Hot path for UDP: a precomputed answer or a cached one, or None to take the
        careful path.  A query seen before is answered from :attr:`_memo` (see
        :data:`Memo`): one dictionary lookup and one concatenation."""
        body = data[2:]
        memo = self._memo.get(body)
        if memo is not None:
            tail, generation, until, stat, kind, route, key, entry = memo
            if generation == self.smap.generation and (
                entry is None
                or (self._clock() < until and (route is None or self._route_matches(client, route)))
            ):
                if entry is not None:
                    # The cache replaces an entry only after ``until`` (from its last tenth
                    # on), and one it evicted stays a correct answer until then too.
                    self._cache.count_hit(key, entry)
                counts = self._fast_counts
                counts[stat] = counts.get(stat, 0) + 1
                if kind:
                    if kind == MESH:
                        self._fast_mesh += 1
                    else:
                        self._fast_cache += 1
                return data[:2] + tail
            del self._memo[body]
        if not self.synced.is_open:
            return None
        reply = fast_response(data, self.smap.answers, self.max_udp)
        if reply is None:
            return self._fast_cached(data, client) if client is not None else None
        # Counted by the raw QTYPE bytes (decoded at scrape time).  Every table answer is
        # NOERROR, so the RCODE needs no look.
        z = data.find(0, 12)
        stat = data[z + 1 : z + 3]
        kind = AUTHORITATIVE
        zt = self._zone_tail
        tail = data[z + self._zone_tail_start : z + 1]
        if tail != zt and tail.lower() != zt and data[z - 5 : z + 1].lower() != ARPA_TAIL:
            stat += b"m"  # neither the cluster zone nor a reverse name: a mesh host
            kind = MESH
            self._fast_mesh += 1
        counts = self._fast_counts
        counts[stat] = counts.get(stat, 0) + 1
        self._remember(body, (reply[2:], self.smap.generation, 0.0, stat, kind, None, b"", None))
        return reply

    def _remember(self, body: bytes, memo: Memo) -> None:
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()  # distinct queries beyond the bound: start over
        self._memo[body] = memo

    def _route_matches(self, client: Client | None, route: bytes) -> bool:
        """A remembered cached answer is for this client's route (the server its pod
        asked)."""
        return client is not None and self._route_key(client) == route

    def _route_key(self, client: Client) -> bytes | None:
        """The cache-key tail of the servers this client's forwarded names go to (outside
        ``--forward`` zones), or None when the careful path must decide (not allowed)."""
        servers = self._servers_key
        if servers is not None:
            return servers
        orig = (
            self.original_destination(client[0], client[1], False)
            if self.original_destination is not None
            else None
        )
        if orig is None:
            return self._upstreams_key
        servers = self._asked_keys.get(orig)
        if servers is None:
            if orig not in self._allowed:
                return None  # REFUSED is the careful path's
            servers = self._asked_keys.setdefault(orig, servers_key((Endpoint(orig, 53),)))
        return servers

    @property
    def routes_by_server(self) -> bool:
        """Forwarded names go to the server each pod asked (no fixed servers): cached answers
        differ by that server."""
        return self._servers_key is None and self.original_destination is not None

    def kernel_route(self, name: bytes, servers: bytes) -> str | None:
        """Which pods the kernel may give a cached answer to, for a name (lowercased wire
        form) whose cache key ends in ``servers`` (:func:`servers_key`), exactly as
        :meth:`fast` would: "" for a pod asking any server (the route is fixed), an address
        for a pod asking that server (the route is the server the pod asked), or None when
        the careful path must decide (a ``--forward`` zone, a server no pod is sent to)."""
        if any(name.endswith(zone) for zone in self._zone_wires):
            return None
        if not self.routes_by_server:
            fixed = self._servers_key if self._servers_key is not None else self._upstreams_key
            return "" if servers == fixed else None
        host, sep, port = servers.decode().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and port == "53" and "," not in host and host in self._allowed:
            return host
        return None

    def _fast_cached(self, data: bytes, client: Client) -> bytes | None:
        """A cached forwarded answer, when the route needs no decision: not a zone of
        ``--forward``, and the server is fixed or the pod's own (an allowed one)."""
        if self.caching.cache is None:
            return None  # before the route: no flow lookup for nothing
        z = data.find(0, 12)
        if self._zone_wires:
            name = data[12 : z + 1].lower()
            if any(name.endswith(zone) for zone in self._zone_wires):
                return None  # may be a stub domain's (the careful path matches labels)
        if self.smap.mesh_scoped_wire(data, 12):
            return None  # forwarded for some namespaces, a mesh host for others
        servers = self._route_key(client)
        if servers is None:
            return None
        hit = self.caching.hot(data, servers, self.smap.mesh_generation)
        if hit is None:
            return None
        reply, until, key, entry = hit
        stat = data[z + 1 : z + 3] + b"c" + bytes((reply[3] & 15,))
        self._fast_cache += 1
        counts = self._fast_counts
        counts[stat] = counts.get(stat, 0) + 1
        # Only a route that depends on the client (the server its pod asked) is checked again
        # on a remembered hit; a change of the fixed servers forgets the memo (reconfigure).
        route = servers if self.routes_by_server else None
        self._remember(
            data[2:], (reply[2:], self.smap.generation, until, stat, CACHE, route, key, entry)
        )
        return reply

    def fast_batch(self, answered: int, elapsed_ns: int, received: int) -> None:
        """The listener answered ``answered`` hot-path queries in a batch of ``received``
        that took ``elapsed_ns``."""
        mesh, self._fast_mesh = self._fast_mesh, 0
        cached, self._fast_cache = self._fast_cache, 0
        self.stats.fast_batch(answered, mesh, elapsed_ns / received / 1e9, cached)

    async def resolve(self, data: bytes, tcp: bool, client: Client | None = None) -> bytes | None:
        """The response to one message, or None when it must not be answered at all."""
        t0 = time.perf_counter()
        decision = await self.decide(data, tcp, client)
        reply = decision.reply
        if reply is not None and len(reply) >= 12:
            qtype = 0
            if reply[4:6] == b"\x00\x01":
                try:
                    end = question_end(reply)
                    qtype = (reply[end - 4] << 8) | reply[end - 3]
                except (ValueError, IndexError):
                    pass
            self.stats.count(
                "tcp" if tcp else "udp",
                qtype,
                reply[3] & 15,
                decision.source,
                time.perf_counter() - t0,
            )
            if (
                not tcp
                and decision.rule in FROM_THE_MAP
                and self.autopath is None
                and not decision.per_client
            ):
                # Made from the service map alone, so the same bytes answer the same query
                # until the map changes: search-path junk then costs a memo lookup.
                rcode = reply[3] & 15
                mesh = decision.source == "mesh"
                stat = qtype.to_bytes(2, "big")
                if mesh:
                    stat += b"m"
                elif rcode:
                    stat += b"a" + bytes((rcode,))
                self._remember(
                    data[2:],
                    (
                        reply[2:],
                        self.smap.generation,
                        0.0,
                        stat,
                        MESH if mesh else AUTHORITATIVE,
                        None,
                        b"",
                        None,
                    ),
                )
        return reply

    async def decide(
        self, data: bytes, tcp: bool, client: Client | None, autopath: bool = True
    ) -> Decision:
        """The response and the rule that made it.  ``autopath`` False: a candidate of an
        autopath walk, answered in full (the walk's own answer is sized for the client)."""
        try:
            query = parse_query(data)
        except Malformed as exc:
            if exc.rcode is None:
                _rl.warning("drop", "dropped a message: %s", exc.reason)
                return Decision(None, "error", Rule.DROPPED)
            _rl.warning(f"rcode-{exc.rcode}", "answered rcode %d: %s", exc.rcode, exc.reason)
            reply = error_response(data, exc.rcode, max_udp=self.max_udp)
            return Decision(reply, "error", Rule.MALFORMED)
        limit = None if tcp or not autopath else udp_limit(query.edns, self.max_udp)
        if query.edns is not None and query.edns.version != 0:
            return Decision(badvers_response(query, self.max_udp), "error", Rule.BADVERS)
        if query.qclass != wire.CLASS_IN or query.qtype in (wire.AXFR, wire.IXFR):
            # Zone transfers of a cluster zone would hand out every service in one go.
            return self._error(query, wire.REFUSED, Rule.REFUSED)
        smap = self.smap
        if not self.synced.is_open and smap.in_zone(query.qname):
            return self._error(query, wire.SERVFAIL, Rule.NOT_SYNCED)
        per_client = smap.mesh_scoped(query.qname)
        local = self.lookup(query, client, per_client)
        if local is not None:
            answer, rule = local
            if rule == Rule.NXDOMAIN and autopath and client is not None and self.autopath:
                done = await self.autopath.complete(query, tcp, client, limit)
                if done is not None:
                    return done
            mesh = rule in (Rule.MESH_WILDCARD, Rule.MESH_SCOPED) or (
                rule == Rule.TABLE
                and not smap.in_zone(query.qname)
                and smap.mesh_host(query.qname) is not None
            )
            reply = assemble(query, answer, self.max_udp, limit)
            decided = Decision(reply, "mesh" if mesh else "authoritative", rule)
            decided.per_client = per_client
            return decided
        target = smap.cname(query.qname)
        if target is not None:
            return await self._chase(query, target, limit, client, tcp)
        route = self.route(client, tcp, query.qname)
        if not route.allowed:
            # --capture-all: the pod addressed a server nobody allowed; relaying would let it
            # reach any DNS server from the node's address (a tunnel past its policies).
            self.stats.not_allowed += 1
            refused = self._error(query, wire.REFUSED, Rule.NOT_ALLOWED)
            refused.via = "no one: " + route.via
            return refused
        decision = await self.caching.forward(query, limit, route.servers, smap.mesh_generation)
        decision.via = "not ours: forwarded to " + route.via
        decision.per_client = per_client
        return decision

    async def _candidate(self, data: bytes, tcp: bool, client: Client) -> Decision:
        return await self.decide(data, tcp, client, autopath=False)

    def _error(self, query: Query, rcode: int, rule: str) -> Decision:
        return Decision(error_response(query.data, rcode, query, self.max_udp), "error", rule)

    def client_namespace(self, client: Client | None) -> str | None:
        """The namespace of the pod asking (None: not a known pod)."""
        if client is None:
            return None
        ip = client[0]
        if ip.startswith("::ffff:"):
            ip = ip[7:]  # a v4 client on a dual-stack socket
        return self.smap.client_namespace(ip)

    def lookup(
        self, query: Query, client: Client | None = None, scoped: bool | None = None
    ) -> tuple[Answer, str] | None:
        """The local answer for a query from ``client`` and its rule, or None if it is not
        ours (or needs a CNAME chase); ``scoped``: :meth:`ServiceMap.mesh_scoped` of the
        name, when the caller knows it already."""
        smap = self.smap
        hit = smap.answers.get(query.key)
        if hit is not None:
            return hit, Rule.TABLE
        name = query.qname
        if query.qtype == wire.ANY:
            every = smap.any_answer(name)
            if every is not None:
                return every, Rule.TABLE
        elif query.qtype not in (wire.A, wire.AAAA):
            made = smap.answer(name, query.qtype)
            if made is not None:
                return made, Rule.TABLE
        if smap.in_zone(name):
            if smap.cname(name) is not None:
                return None
            pod = self._pod_record(name, query.qtype)
            if pod is not None:
                return pod, Rule.POD_RECORD
            # Every name under the cluster domain is ours: search-path junk such as
            # "example.com.default.svc.cluster.local" ends here, never upstream.
            if smap.exists(name):
                return smap.nodata, Rule.EMPTY_NON_TERMINAL
            return smap.nxdomain, Rule.NXDOMAIN
        if query.qtype not in (wire.A, wire.AAAA):
            return None
        if scoped is None:
            scoped = smap.mesh_scoped(name)
        namespace = self.client_namespace(client) if scoped else None
        exact = smap.mesh_host(name, namespace) if scoped else None
        if exact is not None:
            return smap.mesh_reply(exact, query.qtype), Rule.MESH_SCOPED
        wild = smap.mesh_wildcard(name, namespace)
        if wild is not None:
            rule = Rule.MESH_SCOPED if scoped else Rule.MESH_WILDCARD
            return smap.mesh_reply(wild, query.qtype), rule
        return None

    def pod_record_ip(self, name: str) -> str | None:
        """The address a ``a-b-c-d.<ns>.pod.<zone>`` name stands for, when insecure pod
        records synthesize it (an existing namespace, a valid dashed IP); else None."""
        smap = self.smap
        if self.settings.zone.pod_records is not PodRecords.INSECURE:
            return None
        suffix = ".pod." + smap.zone
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        if len(labels) != 2 or not smap.namespace_exists(labels[1]):
            return None
        return wire.undash_ip(labels[0])

    def _pod_record(self, name: str, qtype: int) -> Answer | None:
        """``a-b-c-d.<ns>.pod.<zone>`` in insecure mode: synthesized from the name itself."""
        smap = self.smap
        ip = self.pod_record_ip(name)
        if ip is None:
            return None
        rtype, rdata = wire.rdata_address(ip)
        if qtype not in (rtype, wire.ANY):
            return smap.nodata
        return Answer(
            wire.NOERROR, True, 1, 0, 0, wire.rr(wire.QNAME_POINTER, rtype, smap.ttl, rdata)
        )

    async def _chase(
        self, query: Query, target: str, limit: int | None, client: Client | None, tcp: bool
    ) -> Decision:
        """ExternalName: the CNAME first, then the target's records (spec section 2.5).

        In-cluster targets come from the map; others from upstream.  The final rcode is the
        target's (RFC 6604: NXDOMAIN with a CNAME chain describes the last name).
        """
        smap = self.smap
        chain = [wire.rr(wire.QNAME_POINTER, wire.CNAME, smap.ttl, wire.encode_name(target))]
        owner = target
        rcode = wire.NOERROR
        tail: list[bytes] = []
        authority: list[bytes] = []
        for _ in range(MAX_CNAME_CHAIN):
            nxt = smap.cname(owner)
            if nxt is None:
                break
            chain.append(
                wire.rr(wire.encode_name(owner), wire.CNAME, smap.ttl, wire.encode_name(nxt))
            )
            owner = nxt
        else:
            return self._error(query, wire.SERVFAIL, Rule.CNAME_LOOP)
        source = "authoritative"
        asked: tuple[Endpoint, ...] = ()
        if smap.in_zone(owner):
            tail = smap.address_rrs(owner, (query.qtype,))
            if not tail:
                rcode = wire.NOERROR if smap.exists(owner) else wire.NXDOMAIN
                authority = [smap.nodata.body]
        else:
            mesh = smap.mesh_answer(owner, self.client_namespace(client))
            if mesh is not None and query.qtype in (wire.A, wire.AAAA):
                source = "mesh"
                ips = mesh.v4 if query.qtype == wire.A else mesh.v6
                tail = [
                    wire.rr(
                        wire.encode_name(owner), query.qtype, smap.ttl, wire.rdata_address(ip)[1]
                    )
                    for ip in ips
                ]
            else:
                source = "upstream"
                asked = tuple(self.route(client, tcp, target).servers)
                try:
                    reply = await self.forwarder.forward(build_query(owner, query.qtype), asked)
                except UpstreamFailed:
                    failed = self._error(query, wire.SERVFAIL, Rule.EXTERNALNAME)
                    failed.target, failed.upstreams = owner, asked
                    return failed
                parts = sections(reply)
                if parts is None:
                    rcode = wire.SERVFAIL
                else:
                    tail, authority, rcode = parts.answer, parts.authority, parts.rcode
        body = b"".join(chain) + b"".join(tail) + b"".join(authority)
        answer = Answer(rcode, True, len(chain) + len(tail), len(authority), 0, body)
        reply = assemble(query, answer, self.max_udp, limit)
        return Decision(reply, source, Rule.EXTERNALNAME, target=owner, upstreams=asked)

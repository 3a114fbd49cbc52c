"""The decision for one query: authoritative answer, mesh VIP, search-path junk, or forward.

The resolver never touches sockets.  :meth:`Resolver.fast` is the hot path (table hit, bytes
in, bytes out); :meth:`Resolver.resolve` is the careful path for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import dnslib

from interceptor.dns import wire
from interceptor.dns.message import (
    HEADER,
    Answer,
    Malformed,
    Query,
    assemble,
    badvers_response,
    cap_edns,
    error_response,
    fast_response,
    opt_record,
    parse_query,
    skip_name,
    udp_limit,
)
from interceptor.logutil import RateLimitedLog
from interceptor.model.records import MeshHost
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.autopath import (
    MAX_UPSTREAM_CANDIDATES,
    ClientIndex,
    candidate_wires,
    expansion,
)
from interceptor.resolve.cache import Cache
from interceptor.resolve.upstream import Forwarder, UpstreamFailed, build_query
from interceptor.settings import Endpoint, KubeDnsConfig, PodRecords, Settings, forwarding
from interceptor.telemetry.stats import DURATION_BUCKETS, RequestStats

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

MAX_CNAME_CHAIN = 8

Client = tuple[str, int]
"""The client's (address, port) as the listener saw it."""
OriginalDestination = Callable[[str, int, bool], str | None]
"""(client address, client port, tcp) -> the server address the client's packet was for."""
Result = tuple[bytes | None, str]
"""A response (None: send nothing) and where it came from (the ``source`` metric label)."""

ARPA_TAIL = b"\x04arpa\x00"
FIRST_BUCKET = DURATION_BUCKETS[0]


class Resolver:
    def __init__(
        self,
        smap: ServiceMap,
        forwarder: Forwarder,
        settings: Settings,
        upstreams: Sequence[Endpoint],
        original_destination: OriginalDestination | None = None,
        cache: Cache | None = None,
    ) -> None:
        self.smap = smap
        self.forwarder = forwarder
        self.settings = settings
        self.upstreams = tuple(upstreams)
        """Used when no override is set and the server the client asked is not known."""
        self.original_destination = original_destination
        self.max_udp = settings.server.max_udp_size
        self.cache = cache
        self._zones: list[tuple[str, tuple[Endpoint, ...]]] = []
        self._servers: tuple[Endpoint, ...] = ()
        self.reconfigure(settings.upstream.kube_dns)
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.ready = True
        """False until the source's first full sync: cluster names get SERVFAIL, because an
        NXDOMAIN for a service that does exist would be cached by clients."""
        self.stats = RequestStats()
        self._fast_mesh = 0
        """Hot-path mesh answers since the listener last reported its batch timing."""
        self._fast_counts = self.stats.fast
        self._fast_hist = self.stats.durations["authoritative"]
        self._zone_tail = smap.zone_wire
        self._zone_tail_start = 1 - len(smap.zone_wire)
        self.clients = (
            ClientIndex(smap, settings.autopath.node_search) if settings.autopath.enabled else None
        )

    def reconfigure(self, kube_dns: KubeDnsConfig | None) -> None:
        """Per-zone and default servers from the flags and a kube-dns ConfigMap (also when
        the ConfigMap changes while we run)."""
        zones, servers = forwarding(self.settings.upstream, kube_dns)
        self._zones = sorted(zones, key=lambda z: -len(z[0]))
        self._servers = servers

    @property
    def forward_zones(self) -> list[tuple[str, tuple[Endpoint, ...]]]:
        """Per-zone servers in effect (flags and ConfigMap), longest zone first."""
        return self._zones

    @property
    def default_servers(self) -> tuple[Endpoint, ...]:
        """``--upstream`` or the ConfigMap's upstreamNameservers; () means the server each
        pod asked (or :attr:`upstreams`)."""
        return self._servers

    def upstreams_for(
        self, client: Client | None, tcp: bool, qname: str = ""
    ) -> Sequence[Endpoint]:
        """``--forward`` for the longest matching zone (stubDomains); else ``--upstream``
        (or the ConfigMap's upstreamNameservers); else the server the pod asked (its
        packet's original destination, so the pod's choice of server is respected); else
        the defaults."""
        for zone, servers in self._zones:
            if qname == zone or qname.endswith("." + zone):
                return servers
        if self._servers:
            return self._servers
        if client is not None and self.original_destination is not None:
            orig = self.original_destination(client[0], client[1], tcp)
            if orig is not None:
                return (Endpoint(orig, 53),)
        return self.upstreams

    def fast(self, data: bytes) -> bytes | None:
        """Hot path for UDP: a precomputed answer, or None to take the careful path."""
        if not self.ready:
            return None
        reply = fast_response(data, self.smap.answers, self.max_udp)
        if reply is not None:
            # Counted by the raw QTYPE bytes (decoded at scrape time): the cheapest key to
            # build per query.  Every table answer is NOERROR, so the RCODE needs no look.
            z = data.find(0, 12)
            key = data[z + 1 : z + 3]
            zt = self._zone_tail
            tail = data[z + self._zone_tail_start : z + 1]
            if tail != zt and tail.lower() != zt and data[z - 5 : z + 1].lower() != ARPA_TAIL:
                key += b"m"  # neither the cluster zone nor a reverse name: a mesh host
                self._fast_mesh += 1
            counts = self._fast_counts
            counts[key] = counts.get(key, 0) + 1
        return reply

    def fast_batch(self, answered: int, elapsed_ns: int, received: int) -> None:
        """The listener answered ``answered`` hot-path queries in a batch of ``received``
        that took ``elapsed_ns``: each answer is timed as the batch's time over its queries
        (timing every answer would cost more than answering)."""
        seconds = elapsed_ns / received / 1e9
        mesh = self._fast_mesh
        if mesh:
            self._fast_mesh = 0
            self.stats.durations["mesh"].observe(seconds, mesh)
            answered -= mesh
        if answered:
            hist = self._fast_hist
            if seconds <= FIRST_BUCKET:  # nearly always: skip the bucket search
                hist.counts[0] += answered
                hist.total += seconds * answered
            else:
                hist.observe(seconds, answered)

    async def resolve(self, data: bytes, tcp: bool, client: Client | None = None) -> bytes | None:
        """The response to one message, or None when it must not be answered at all."""
        t0 = time.perf_counter()
        reply, source = await self._answer(data, tcp, client)
        if reply is not None and len(reply) >= 12:
            qtype = 0
            if reply[4:6] == b"\x00\x01":
                try:
                    end = wire_question_end(reply)
                    qtype = (reply[end - 4] << 8) | reply[end - 3]
                except (ValueError, IndexError):
                    pass
            self.stats.count(
                "tcp" if tcp else "udp", qtype, reply[3] & 15, source, time.perf_counter() - t0
            )
        return reply

    async def _answer(
        self, data: bytes, tcp: bool, client: Client | None, autopath: bool = True
    ) -> Result:
        """The response and its source.  ``autopath`` False: a candidate of an autopath
        walk, answered in full (the walk's own answer is sized for the client)."""
        try:
            query = parse_query(data)
        except Malformed as exc:
            if exc.rcode is None:
                _rl.warning("drop", "dropped a message: %s", exc.reason)
                return None, "error"
            _rl.warning(f"rcode-{exc.rcode}", "answered rcode %d: %s", exc.rcode, exc.reason)
            return error_response(data, exc.rcode, max_udp=self.max_udp), "error"
        limit = None if tcp or not autopath else udp_limit(query.edns, self.max_udp)
        if query.edns is not None and query.edns.version != 0:
            return badvers_response(query, self.max_udp), "error"
        if query.qclass != wire.CLASS_IN or query.qtype in (wire.AXFR, wire.IXFR):
            # Zone transfers of a cluster zone would hand out every service in one go.
            return error_response(data, wire.REFUSED, query, self.max_udp), "error"
        smap = self.smap
        if not self.ready and smap.in_zone(query.qname):
            return error_response(data, wire.SERVFAIL, query, self.max_udp), "error"
        answer = self.lookup(query)
        if answer is not None:
            if answer is smap.nxdomain and autopath and client is not None and self.clients:
                done = await self._autopath(query, tcp, client, limit)
                if done is not None:
                    return done
            mesh = not smap.in_zone(query.qname) and (
                smap.mesh_host(query.qname) is not None or smap.mesh_wildcard(query.qname)
            )
            return assemble(query, answer, self.max_udp, limit), "mesh" if mesh else "authoritative"
        target = smap.cname(query.qname)
        if target is not None:
            return await self._chase(query, target, limit, self.upstreams_for(client, tcp, target))
        return await self._forward(query, limit, self.upstreams_for(client, tcp, query.qname))

    async def _autopath(
        self, query: Query, tcp: bool, client: Client, limit: int | None
    ) -> Result | None:
        """``query`` is NXDOMAIN here; if it is the first search expansion of a known pod,
        answer with the first candidate of that pod's search list that exists.

        Each candidate is resolved as the pod itself would ask it (same flags and EDNS), so
        cluster candidates come from the map and the others share the cache with the pod's
        own queries; the upstream ones are asked together, not one after another.  Then, in
        the pod's order, the first candidate that is not NXDOMAIN decides:

        * it has records: CNAME from the asked name to it, then its records (a hit);
        * it is NODATA and every later candidate is NXDOMAIN: CNAME plus that NODATA, which
          is where the pod's own search would end too, whatever its stub resolver;
        * anything else (SERVFAIL, or NODATA with more to find later, where glibc searches
          on and musl stops): the asked name's own NXDOMAIN, so the pod's own search goes on
          exactly as without autopath (a miss).  Nothing found is a miss too.
        """
        assert self.clients is not None
        search = self.clients.search(client[0])
        if search is None:
            return None
        base = expansion(query.qname, search, self.smap.zone)
        if base is None:
            return None
        qname_wire = query.data[12 : query.question_end - 4]
        tail = query.data[query.question_end - 4 :]  # QTYPE, QCLASS, the client's OPT
        candidates = candidate_wires(qname_wire, search[0], search[1:])
        local = [self.smap.in_zone(name) for _, name in candidates]
        if local.count(False) > MAX_UPSTREAM_CANDIDATES:
            return None  # one packet must not become dozens of upstream queries
        tasks: dict[int, asyncio.Future[Result]] = {}

        def start(i: int) -> None:
            synthetic = query.data[:12] + candidates[i][0] + tail
            tasks[i] = asyncio.ensure_future(self._answer(synthetic, tcp, client, False))

        results: list[Result] = []
        decided: int | None = None
        try:
            for i in range(len(candidates)):
                if i not in tasks:
                    if local[i]:
                        start(i)  # from the map: no I/O, nothing to overlap
                    else:
                        # The first upstream candidate: ask it and every later one at once,
                        # one round trip in all instead of one each.
                        for j in range(i, len(candidates)):
                            if not local[j]:
                                start(j)
                results.append(await tasks[i])
                decided = _autopath_choice(results, len(candidates))
                if decided is not None:
                    break
        finally:
            for task in tasks.values():
                task.cancel()  # their upstream queries still complete, into the cache
        if decided is None:
            decided = -1
        if decided < 0:
            self.stats.autopath["miss"] += 1
            return None
        reply, source = results[decided]
        assert reply is not None
        composed = self._cname_to(query, reply, limit)
        if composed is None:
            self.stats.autopath["miss"] += 1
            return None
        self.stats.autopath["hit"] += 1
        return composed, source

    def _cname_to(self, query: Query, reply: bytes, limit: int | None) -> bytes | None:
        """The answer to ``query``: a CNAME to the question of ``reply`` (a full response for
        the candidate), then ``reply``'s records.  The CNAME lives no longer than the
        cluster's negative TTL: a service created meanwhile under an earlier candidate would
        have ended the pod's own search there."""
        try:
            msg = dnslib.DNSRecord.parse(reply)
        except (dnslib.DNSError, ValueError, IndexError, struct.error):
            return None
        target = reply[12 : wire_question_end(reply) - 4]
        answers = [_pack_rr(r) for r in msg.rr]
        authority = [_pack_rr(r) for r in msg.auth]
        additional = [_pack_rr(r) for r in msg.ar if r.rtype != wire.OPT]
        ttls = [r.ttl for r in msg.rr] or [
            min(r.ttl, r.rdata.times[4]) for r in msg.auth if r.rtype == wire.SOA
        ]
        ttl = min([self.smap.ttl, *ttls])
        cname = wire.rr(wire.QNAME_POINTER, wire.CNAME, ttl, target)
        body = cname + b"".join(answers) + b"".join(authority) + b"".join(additional)
        aa = bool(msg.header.aa)
        answer = Answer(
            msg.header.rcode, aa, 1 + len(answers), len(authority), len(additional), body
        )
        return assemble(query, answer, self.max_udp, limit)

    def lookup(self, query: Query) -> Answer | None:
        """The local answer for a query, or None if it is not ours (or needs a CNAME chase)."""
        smap = self.smap
        hit = smap.answers.get(query.key)
        if hit is not None:
            return hit
        name = query.qname
        if smap.in_zone(name):
            if smap.cname(name) is not None:
                return None
            pod = self._pod_record(name, query.qtype)
            if pod is not None:
                return pod
            # Every name under the cluster domain is ours: search-path junk such as
            # "example.com.default.svc.cluster.local" ends here, never upstream.
            return smap.nodata if smap.exists(name) else smap.nxdomain
        wild = smap.mesh_wildcard(name)
        if wild is not None and query.qtype in (wire.A, wire.AAAA):
            return _mesh_answer(wild, query.qtype, smap.ttl, smap.mesh_nodata)
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
        self, query: Query, target: str, limit: int | None, upstreams: Sequence[Endpoint]
    ) -> Result:
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
            return error_response(query.data, wire.SERVFAIL, query, self.max_udp), "error"
        source = "authoritative"
        if smap.in_zone(owner):
            tail = smap.address_rrs(owner, (query.qtype,))
            if not tail:
                rcode = wire.NOERROR if smap.exists(owner) else wire.NXDOMAIN
                authority = [smap.nodata.body]
        else:
            mesh = smap.mesh_host(owner)
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
                try:
                    reply = await self.forwarder.forward(build_query(owner, query.qtype), upstreams)
                except UpstreamFailed:
                    return error_response(query.data, wire.SERVFAIL, query, self.max_udp), "error"
                tail, authority, rcode = _sections(reply)
        body = b"".join(chain) + b"".join(tail) + b"".join(authority)
        answer = Answer(rcode, True, len(chain) + len(tail), len(authority), 0, body)
        return assemble(query, answer, self.max_udp, limit), source

    async def _forward(
        self, query: Query, limit: int | None, upstreams: Sequence[Endpoint]
    ) -> Result:
        """Through the shared cache; identical questions in flight share one upstream query;
        when every upstream fails, a stale answer beats SERVFAIL (RFC 8767)."""
        key = _cache_key(query, upstreams)
        cache = self.cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                reply, entry = hit
                if cache.wants_prefetch(entry):
                    entry.prefetching = True
                    cache.stats.prefetches += 1
                    self._background(self._fetch(key, cap_edns(query, self.max_udp), upstreams))
                return _for_client(reply, query, limit, self.max_udp), "cache"
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                self._fetch(key, cap_edns(query, self.max_udp), upstreams)
            )
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            reply = await asyncio.shield(pending)
        except UpstreamFailed:
            stale = cache.get(key, stale=True) if cache is not None else None
            if stale is not None:
                return _for_client(stale[0], query, limit, self.max_udp), "stale"
            return error_response(query.data, wire.SERVFAIL, query, self.max_udp), "error"
        return _for_client(reply, query, limit, self.max_udp), "upstream"

    async def _fetch(self, key: bytes, data: bytes, upstreams: Sequence[Endpoint]) -> bytes:
        reply = await self.forwarder.forward(data, upstreams)
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _autopath_choice(results: list[Result], total: int) -> int | None:
    """Which candidate answers (its index), -1 for none (the asked name's NXDOMAIN stands),
    or None while the results so far (in search order) cannot tell yet."""
    for i, (reply, _) in enumerate(results):
        if reply is None or len(reply) < 12:
            return -1
        rcode = reply[3] & 15
        if rcode == wire.NXDOMAIN:
            continue
        if rcode != wire.NOERROR:
            return -1
        if reply[6:8] != b"\x00\x00":
            return i  # records (or a CNAME chain): the pod's search would stop here
        # NODATA: final only if nothing after it exists (glibc searches on, musl stops).
        later = results[i + 1 :]
        if any(r is None or len(r) < 12 or r[3] & 15 != wire.NXDOMAIN for r, _ in later):
            return -1
        return i if len(results) == total else None
    return None if len(results) < total else -1


def wire_question_end(msg: bytes) -> int:
    """Offset just past the first question of a message.  Raises ValueError/IndexError."""
    return skip_name(msg, 12) + 4


def _mesh_answer(host: MeshHost, qtype: int, ttl: int, nodata: Answer) -> Answer:
    ips = host.v4 if qtype == wire.A else host.v6
    if not ips:
        return nodata
    body = b"".join(
        wire.rr(wire.QNAME_POINTER, qtype, ttl, wire.rdata_address(ip)[1]) for ip in ips
    )
    return Answer(wire.NOERROR, True, len(ips), 0, 0, body)


def _sections(reply: bytes) -> tuple[list[bytes], list[bytes], int]:
    """Answer and authority records of an upstream reply, re-encoded standalone (dnslib:
    correctness over speed here, as the reply's names may use compression)."""
    try:
        msg = dnslib.DNSRecord.parse(reply)
    except (dnslib.DNSError, ValueError, IndexError, struct.error):
        return [], [], wire.SERVFAIL
    return ([_pack_rr(r) for r in msg.rr], [_pack_rr(r) for r in msg.auth], msg.header.rcode)


class _FlatBuffer(dnslib.DNSBuffer):  # type: ignore[misc]
    """No name compression: a record packed alone is spliced into another message, where a
    pointer to an offset of its own buffer would point into that message's header."""

    def encode_name(self, name: object) -> None:
        self.encode_name_nocompress(name)


def _pack_rr(record: dnslib.RR) -> bytes:
    buf = _FlatBuffer()
    record.pack(buf)
    return bytes(buf.data)


def _cache_key(query: Query, upstreams: Sequence[Endpoint]) -> bytes:
    """Question (lowercased name, type, class), whether the client spoke EDNS and set DO and
    CD (they change the reply), and the servers asked (split horizons stay apart)."""
    edns = query.edns
    flags = (1 if edns else 0) | (2 if edns and edns.do else 0) | (4 if query.flags & 0x10 else 0)
    servers = ",".join(map(str, upstreams)).encode()
    return query.key + struct.pack("!HB", query.qclass, flags) + servers


def _for_client(reply: bytes, query: Query, limit: int | None, max_udp: int) -> bytes:
    """A cached or shared reply, made this client's: its ID and its question bytes (case
    included), truncated if it cannot take it."""
    qend = query.question_end
    if reply[12:qend].lower() != query.data[12:qend].lower():
        return error_response(query.data, wire.SERVFAIL, query, max_udp) or b""
    out = query.data[:2] + reply[2:12] + query.data[12:qend] + reply[qend:]
    if limit is not None and len(out) > limit:
        return _truncate(out, query, max_udp)
    return out


def _truncate(reply: bytes, query: Query, max_udp: int) -> bytes:
    """An upstream reply too big for the client: header and question only, TC set."""
    _, flags, *_ = HEADER.unpack_from(reply)
    opt = opt_record(max_udp, query.edns.do) if query.edns is not None else b""
    header = HEADER.pack(query.id, flags | 0x0200, 1, 0, 0, 1 if opt else 0)
    return header + query.data[12 : query.question_end] + opt

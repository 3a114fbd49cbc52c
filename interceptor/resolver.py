"""The decision for one query: authoritative answer, mesh VIP, search-path junk, or forward.

The resolver never touches sockets.  :meth:`Resolver.fast` is the hot path (table hit, bytes
in, bytes out); :meth:`Resolver.resolve` is the careful path for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import dnslib

from interceptor.cache import Cache
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
    udp_limit,
)
from interceptor.logutil import RateLimitedLog
from interceptor.model.records import MeshHost
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import Endpoint, PodRecords, Settings
from interceptor.upstream import Forwarder, UpstreamFailed, build_query

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

MAX_CNAME_CHAIN = 8

Client = tuple[str, int]
"""The client's (address, port) as the listener saw it."""
OriginalDestination = Callable[[str, int, bool], str | None]
"""(client address, client port, tcp) -> the server address the client's packet was for."""


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
        self._zones = sorted(settings.upstream.zones, key=lambda z: -len(z[0]))
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.ready = True
        """False until the source's first full sync: cluster names get SERVFAIL, because an
        NXDOMAIN for a service that does exist would be cached by clients."""

    def upstreams_for(
        self, client: Client | None, tcp: bool, qname: str = ""
    ) -> Sequence[Endpoint]:
        """``--forward`` for the longest matching zone (stubDomains); else ``--upstream``;
        else the server the pod asked (its packet's original destination, so the pod's
        choice of server is respected); else the defaults."""
        for zone, servers in self._zones:
            if qname == zone or qname.endswith("." + zone):
                return servers
        if self.settings.upstream.servers:
            return self.settings.upstream.servers
        if client is not None and self.original_destination is not None:
            orig = self.original_destination(client[0], client[1], tcp)
            if orig is not None:
                return (Endpoint(orig, 53),)
        return self.upstreams

    def fast(self, data: bytes) -> bytes | None:
        """Hot path for UDP: a precomputed answer, or None to take the careful path."""
        if not self.ready:
            return None
        return fast_response(data, self.smap.answers, self.max_udp)

    async def resolve(self, data: bytes, tcp: bool, client: Client | None = None) -> bytes | None:
        """The response to one message, or None when it must not be answered at all."""
        try:
            query = parse_query(data)
        except Malformed as exc:
            if exc.rcode is None:
                _rl.warning("drop", "dropped a message: %s", exc.reason)
                return None
            _rl.warning(f"rcode-{exc.rcode}", "answered rcode %d: %s", exc.rcode, exc.reason)
            return error_response(data, exc.rcode, max_udp=self.max_udp)
        limit = None if tcp else udp_limit(query.edns, self.max_udp)
        if query.edns is not None and query.edns.version != 0:
            return badvers_response(query, self.max_udp)
        if query.qclass != wire.CLASS_IN or query.qtype in (wire.AXFR, wire.IXFR):
            # Zone transfers of a cluster zone would hand out every service in one go.
            return error_response(data, wire.REFUSED, query, self.max_udp)
        if not self.ready and self.smap.in_zone(query.qname):
            return error_response(data, wire.SERVFAIL, query, self.max_udp)
        answer = self.lookup(query)
        if answer is not None:
            return assemble(query, answer, self.max_udp, limit)
        target = self.smap.cname(query.qname)
        if target is not None:
            return await self._chase(query, target, limit, self.upstreams_for(client, tcp, target))
        return await self._forward(query, limit, self.upstreams_for(client, tcp, query.qname))

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

    def _pod_record(self, name: str, qtype: int) -> Answer | None:
        """``a-b-c-d.<ns>.pod.<zone>`` in insecure mode: synthesized from the name itself."""
        smap = self.smap
        if self.settings.zone.pod_records is not PodRecords.INSECURE:
            return None
        suffix = ".pod." + smap.zone
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        if len(labels) != 2 or not smap.namespace_exists(labels[1]):
            return None
        ip = wire.undash_ip(labels[0])
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
    ) -> bytes | None:
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
            return error_response(query.data, wire.SERVFAIL, query, self.max_udp)
        if smap.in_zone(owner):
            tail = smap.address_rrs(owner, (query.qtype,))
            if not tail:
                rcode = wire.NOERROR if smap.exists(owner) else wire.NXDOMAIN
                authority = [smap.nodata.body]
        else:
            mesh = smap.mesh_host(owner)
            if mesh is not None and query.qtype in (wire.A, wire.AAAA):
                ips = mesh.v4 if query.qtype == wire.A else mesh.v6
                tail = [
                    wire.rr(
                        wire.encode_name(owner), query.qtype, smap.ttl, wire.rdata_address(ip)[1]
                    )
                    for ip in ips
                ]
            else:
                try:
                    reply = await self.forwarder.forward(build_query(owner, query.qtype), upstreams)
                except UpstreamFailed:
                    return error_response(query.data, wire.SERVFAIL, query, self.max_udp)
                tail, authority, rcode = _sections(reply)
        body = b"".join(chain) + b"".join(tail) + b"".join(authority)
        answer = Answer(rcode, True, len(chain) + len(tail), len(authority), 0, body)
        return assemble(query, answer, self.max_udp, limit)

    async def _forward(
        self, query: Query, limit: int | None, upstreams: Sequence[Endpoint]
    ) -> bytes | None:
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
                return _for_client(reply, query, limit, self.max_udp)
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
                return _for_client(stale[0], query, limit, self.max_udp)
            return error_response(query.data, wire.SERVFAIL, query, self.max_udp)
        return _for_client(reply, query, limit, self.max_udp)

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


def _pack_rr(record: dnslib.RR) -> bytes:
    buf = dnslib.DNSBuffer()
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

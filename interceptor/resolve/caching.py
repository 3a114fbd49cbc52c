"""The forwarder wrapped in the node cache, as CoreDNS puts ``cache`` in front of ``forward``.

Identical questions in flight share one upstream query (coalescing); a popular entry near
the end of its life is refreshed in the background (prefetch); and when every upstream fails,
an expired answer beats SERVFAIL (serve-stale, RFC 8767).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple

from interceptor.dns import wire
from interceptor.dns.message import (
    Query,
    cap_edns,
    error_response,
    fit,
    opt_record,
    plain_tail,
)
from interceptor.resolve.cache import Cache, Entry
from interceptor.resolve.decision import Decision, Rule
from interceptor.resolve.upstream import Upstream, UpstreamFailed
from interceptor.settings import Endpoint

STALE_ON = frozenset((wire.SERVFAIL, wire.REFUSED))
"""Upstream answers that a stale answer beats (RFC 8767 section 4)."""

_XFR = frozenset((wire.IXFR, wire.AXFR))


class CachingForwarder:
    def __init__(
        self, upstream: Upstream, cache: Cache | None, max_udp: int, stale_after: float = 1.8
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.max_udp = max_udp
        self.stale_after = stale_after
        """The client response timer: how long a name with a stale answer waits upstream."""
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def forward(
        self, query: Query, limit: int | None, servers: Sequence[Endpoint], checked: int = -1
    ) -> Decision:
        """The answer to ``query`` from the cache or ``servers``, made this client's.
        ``checked``: the mesh generation at which the caller found the name not ours."""
        key = cache_key(query, servers_key(servers))
        asked = tuple(servers)
        cache = self.cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                reply, entry = hit
                entry.checked = checked
                if cache.claim_prefetch(entry):
                    data = cap_edns(query, self.max_udp)
                    self._background(self._fetch(key, data, servers, checked))
                out = for_client(reply, query, limit, self.max_udp)
                return Decision(out, "cache", Rule.CACHED, upstreams=asked)
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                self._fetch(key, cap_edns(query, self.max_udp), servers, checked)
            )
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        # With a stale answer in hand, the client waits no longer than its response timer:
        # then it gets the stale answer, and the refresh goes on into the cache.
        patience = self.stale_after if cache is not None and cache.has_stale(key) else None
        try:
            reply = await asyncio.wait_for(asyncio.shield(pending), patience)
        except (UpstreamFailed, TimeoutError):
            stale = self._stale(key, query, limit, asked)
            if stale is not None:
                return stale
            try:  # nothing stale after all: the upstream's outcome, whenever it comes
                reply = await asyncio.shield(pending)
            except UpstreamFailed:
                failed = error_response(query.data, wire.SERVFAIL, query, self.max_udp)
                return Decision(failed, "error", Rule.UPSTREAM_FAILED, upstreams=asked)
        if len(reply) >= 12 and reply[3] & 15 in STALE_ON:
            stale = self._stale(key, query, limit, asked)
            if stale is not None:
                return stale
        out = for_client(reply, query, limit, self.max_udp)
        return Decision(out, "upstream", Rule.FORWARDED, upstreams=asked)

    def _stale(
        self, key: bytes, query: Query, limit: int | None, asked: tuple[Endpoint, ...]
    ) -> Decision | None:
        got = self.cache.get(key, stale=True) if self.cache is not None else None
        if got is None:
            return None
        out = for_client(got[0], query, limit, self.max_udp)
        return Decision(out, "stale", Rule.STALE, upstreams=asked)

    async def _fetch(
        self, key: bytes, data: bytes, servers: Sequence[Endpoint], checked: int
    ) -> bytes:
        reply = await self.upstream.forward(data, servers)
        if self.cache is not None:
            self.cache.put(key, reply, checked)
        return reply

    def hot(
        self, data: bytes, servers: bytes, generation: int
    ) -> tuple[bytes, float, bytes, Entry] | None:
        """The hot path: a cached answer to a plain UDP query, bytes in, bytes out (ID and
        the question's case patched; TTLs counted down by the cache), byte for byte what
        :meth:`forward` would answer; or None for anything else, a miss, or an answer the
        client cannot take whole.  ``servers`` is :func:`servers_key` of its route.  With
        the reply: until when it stays this query's answer, and the cache key and entry it
        came from (a caller that remembers the reply checks that the cache still holds
        that entry, and counts its hits)."""
        cache = self.cache
        if cache is None:
            return None
        if len(data) < 17 or data[2] & 0xF8:
            return None  # a response, or an opcode other than QUERY
        z = data.find(0, 12)
        if z < 0:
            return None
        qend = z + 5
        if data[z + 3 : qend] != b"\x00\x01" or data[z + 1] == 0 and data[z + 2] in _XFR:
            return None  # another class, or a zone transfer: the careful path refuses
        shape = plain_tail(data, qend, self.max_udp)
        if shape is None:
            return None
        # plain_tail's shape values are the key's KEY_EDNS and KEY_EDNS | KEY_DO bits.
        limit, flags = shape
        if data[3] & 0x10:
            flags |= KEY_CD
        # Only the name is lowercased: a type's bytes can look like ASCII letters (65, HTTPS).
        name = data[12 : z + 1].lower()
        key = name + data[z + 1 : qend] + bytes((flags,)) + servers
        hit = cache.hot(key, generation)
        if hit is None:
            return None
        reply, until, entry = hit
        if len(reply) > limit or reply[12 : z + 1].lower() != name:
            return None
        return data[:2] + reply[2:12] + data[12:qend] + reply[qend:], until, key, entry

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def servers_key(servers: Sequence[Endpoint]) -> bytes:
    """The servers asked, as the tail of a cache key (split horizons stay apart)."""
    return ",".join(map(str, servers)).encode()


KEY_EDNS, KEY_DO, KEY_CD = 1, 2, 4
"""The flags byte of a cache key: the client spoke EDNS, set DO, set CD (each changes the
reply).  KEY_EDNS and KEY_EDNS | KEY_DO are :func:`plain_tail`'s EDNS and EDNS_DO."""


class KeyParts(NamedTuple):
    """A cache key taken apart (:func:`cache_key`)."""

    name: bytes
    """Lowercased wire form, with its root label."""
    qtype: int
    qclass: int
    flags: int
    servers: bytes


def cache_key(query: Query, servers: bytes) -> bytes:
    """The question as asked (lowercased name, type, class), whether the client spoke EDNS and
    set DO and CD (they change the reply), and :func:`servers_key` of the servers asked."""
    edns = query.edns
    flags = (
        (KEY_EDNS if edns else 0)
        | (KEY_DO if edns and edns.do else 0)
        | (KEY_CD if query.flags & 0x10 else 0)
    )
    return query.key + struct.pack("!HB", query.qclass, flags) + servers


def key_parts(key: bytes) -> KeyParts | None:
    """The parts of a :func:`cache_key` (None for bytes that are not one)."""
    z = key.find(0)
    if z < 0 or len(key) < z + 6:
        return None
    qtype, qclass, flags = struct.unpack_from("!HHB", key, z + 1)
    return KeyParts(key[: z + 1], qtype, qclass, flags, key[z + 6 :])


def for_client(reply: bytes, query: Query, limit: int | None, max_udp: int) -> bytes:
    """A cached or shared reply, made this client's: its ID and its question bytes (case
    included), truncated if it cannot take it."""
    qend = query.question_end
    if reply[12:qend].lower() != query.data[12:qend].lower():
        return error_response(query.data, wire.SERVFAIL, query, max_udp) or b""
    out = query.data[:2] + reply[2:12] + query.data[12:qend] + reply[qend:]
    if limit is not None and len(out) > limit:
        # Cut down as RFC 2181 section 9 says: additional first, TC only when the answer
        # section itself does not fit, whole records kept.
        opt = opt_record(max_udp, query.edns.do) if query.edns is not None else b""
        return fit(out, limit, opt)
    return out

"""The in-kernel fast path's answer maps: FP_ANSWERS kept in step with the service map,
FP_OWNERS and FP_JUNK for search-path junk, FP_CACHE for hot names of the resolver's cache.

Each entry is a copy of one precomputed answer of the resolver's table, split the way
bpf/lib/fastpath.h builds a response: header bits and counts, then the body that follows the
question.  Only A and AAAA questions are copied (what pods ask most, by far); other types,
and answers or names too big for the map's fixed-size slots, stay with the resolver.

One answer is never seen half-written: a hash-map update replaces the whole element at once
(the kernel swaps in a new element under RCU), so a packet sees the old answer or the new one.
"""

from __future__ import annotations

import ctypes as ct
import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from interceptor.datapath import maps
from interceptor.datapath.bpfsys import PinnedMap
from interceptor.dns import wire
from interceptor.dns.message import Answer
from interceptor.errors import InterceptorError
from interceptor.logutil import RateLimitedLog

log = logging.getLogger(__name__)

FASTPATH_QTYPES = frozenset({wire.A, wire.AAAA})


def encode(key: bytes, answer: Answer, view: int = 0) -> tuple[maps.FpKey, maps.FpAnswer] | None:
    """The map entry for one table entry (for the pods of ``view``; 0: every pod), or None
    when it is not for the fast path."""
    if struct.unpack("!H", key[-2:])[0] not in FASTPATH_QTYPES:
        return None
    k = _key_only(key, view)
    if k is None or len(answer.body) > maps.FP_BODY_MAX:
        return None
    return k, answer_value(answer)


def answer_value(answer: Answer) -> maps.FpAnswer:
    """An answer as the kernel stores it; its body must fit FP_BODY_MAX (the callers check:
    a longer one would be written past the slot)."""
    return _slot(answer.flag_hi, answer.flag_lo, (answer.an, answer.ns, answer.ar), answer.body)


def _slot(flag_hi: int, flag_lo: int, counts: Iterable[int], body: bytes) -> maps.FpAnswer:
    """struct fp_answer: header bytes 2 and 3, the three section counts, the body."""
    if len(body) > maps.FP_BODY_MAX:
        raise ValueError(f"answer body of {len(body)} bytes exceeds a kernel slot")
    v = maps.FpAnswer()
    v.flag_hi = flag_hi
    v.flag_lo = flag_lo
    # Counts go in network order: the program copies them into the header as they are.
    v.an, v.ns, v.ar = (_wire16(n) for n in counts)
    v.len = len(body)
    ct.memmove(v.body, body, len(body))
    return v


class AnswerMap:
    """Writes the service map's answers into the pinned FP_ANSWERS map."""

    def __init__(self, pinned: PinnedMap, capacity: int) -> None:  # type: ignore[type-arg]
        self.map = pinned
        self.capacity = capacity
        self.skipped = 0
        """Answers left to the resolver because the map was full."""
        self._full_log = RateLimitedLog(log, 60.0)

    def load(self, table: Mapping[bytes, Answer]) -> int:
        """Make the map hold exactly the fast-path share of ``table`` (agent start: the
        pinned map may hold a previous run's answers).  Returns the number of entries."""
        wanted: dict[bytes, tuple[maps.FpKey, maps.FpAnswer]] = {}
        for key, answer in table.items():
            entry = encode(key, answer)
            if entry is not None:
                wanted[bytes(entry[0])] = entry
        for k in list(self.map.keys()):
            if bytes(k) not in wanted:
                self.map.delete(k)
        for k, v in wanted.values():
            self.put(k, v)
        return len(wanted) - self.skipped

    def apply(self, table: Mapping[bytes, Answer], changed: Iterable[bytes]) -> None:
        """Bring the entries of ``changed`` table keys in step (a service map event)."""
        for key in changed:
            answer = table.get(key)
            entry = encode(key, answer) if answer is not None else None
            if entry is not None:
                self.put(*entry)
                continue
            k = _key_only(key)
            if k is not None:
                self.map.delete(k)

    def put(self, k: maps.FpKey, v: maps.FpAnswer) -> bool:
        """Write one entry; False when the map is full (the resolver answers it)."""
        try:
            self.map.put(k, v)
            return True
        except InterceptorError as exc:
            # Full (E2BIG/ENOMEM): the resolver answers this name; nothing is lost.
            self.skipped += 1
            self._full_log.warning(
                "fastpath-full",
                "fast-path map full (%d entries): %s; more names answered in userspace",
                self.capacity,
                exc,
            )
            return False


class ViewAnswers:
    """The FP_ANSWERS entries of mesh hosts that namespaces see differently (ServiceEntry
    ``exportTo``): one per name, type and view (a namespace's number, in its pods' PODS
    entries), for the views that see the host with an address.  They never have a view-0
    entry, so a pod without an entry of its view is answered by the resolver, which decides
    by the pod's namespace.  :class:`AnswerMap` keeps view 0; its load at start removes
    every view's entries a previous agent left (its views numbered other namespaces)."""

    def __init__(self, answers: AnswerMap) -> None:
        self.answers = answers
        self._held: dict[bytes, bytes] = {}
        """key bytes -> value bytes, as written"""

    def sync(self, wanted: Mapping[tuple[bytes, int], Answer]) -> int:
        """Make the views' entries exactly ``wanted``: (table key, view) -> answer.
        Returns the number of entries held."""
        entries: dict[bytes, tuple[maps.FpKey, maps.FpAnswer]] = {}
        for (key, view), answer in wanted.items():
            if view <= 0:
                raise ValueError("view entries need a view")
            entry = encode(key, answer, view)
            if entry is not None:
                entries[bytes(entry[0])] = entry
        for kb in [kb for kb in self._held if kb not in entries]:
            self.answers.map.delete(maps.FpKey.from_buffer_copy(kb))
            del self._held[kb]
        for kb, (k, v) in entries.items():
            vb = bytes(v)
            if self._held.get(kb) != vb and self.answers.put(k, v):
                self._held[kb] = vb
        return len(self._held)


def _wire16(n: int) -> int:
    """The host-order u16 whose memory bytes are ``n`` in network order."""
    return int.from_bytes(struct.pack("!H", n), "little")


def _key_only(key: bytes, view: int = 0) -> maps.FpKey | None:
    """The kernel key of a table key (:func:`wire.table_key`), or None for a name too long."""
    name = key[:-2]
    if len(name) > maps.FP_NAME_MAX - 1:
        return None  # the kernel key needs the root label's zero inside FP_NAME_MAX
    k = maps.FpKey()
    ct.memmove(k.name, name, len(name))
    k.qtype = int.from_bytes(key[-2:], "little")  # the bytes as they are on the wire
    k.view = view
    return k


class JunkAnswers:
    """The kernel's search-path junk test: FP_OWNERS holds every name that exists in the
    cluster zone outside ``pod.<zone>`` (empty non-terminals included), FP_JUNK the zone,
    the ``pod.<zone>`` exclusion and the NXDOMAIN.

    The kernel answers NXDOMAIN for a name that is missing from FP_OWNERS, so the set must be
    complete: a name that could not be added (the map is full) switches junk answering off
    (the resolver answers, as it would anyway), and it stays off until a reload."""

    def __init__(
        self,
        owners: PinnedMap,  # type: ignore[type-arg]
        junk: PinnedMap,  # type: ignore[type-arg]
        zone: str,
        nxdomain: Answer,
        capacity: int,
    ) -> None:
        self.owners = owners
        self.junk = junk
        self.capacity = capacity
        self.zone = zone
        self.pods = "pod." + zone
        self.nxdomain = nxdomain
        self.on = False

    def _ours(self, name: str) -> bool:
        """In the zone, and not a pod record's (those the resolver synthesizes)."""
        if not (name == self.zone or name.endswith("." + self.zone)):
            return False
        return not (name == self.pods or name.endswith("." + self.pods))

    def load(self, names: Iterable[str], enabled: bool) -> int:
        """Make FP_OWNERS hold exactly the existing names of the zone (pod records aside),
        then switch junk answering on (``enabled``: autopath off) or off.  Returns the
        number of names."""
        self._switch(False)  # never answer junk from a set being rebuilt
        for k in list(self.owners.keys()):
            self.owners.delete(k)
        if not enabled:
            return 0
        count = 0
        for name in names:
            if self._ours(name):
                if not self._put(name):
                    return count
                count += 1
        self._switch(True)
        return count

    def apply(self, changed: Iterable[str], exists: Callable[[str], bool]) -> None:
        """Bring the names of ``changed`` in step (a service map event)."""
        if not self.on:
            return
        for name in changed:
            if not self._ours(name):
                continue
            if exists(name):
                self._put(name)
            else:
                k = _name_key(name)
                if k is not None:
                    self.owners.delete(k)

    def _put(self, name: str) -> bool:
        k = _name_key(name)
        if k is None:
            return True  # longer than a kernel key: the kernel never tests such a name
        try:
            self.owners.put(k, ct.c_uint8(1))
        except InterceptorError as exc:
            log.warning(
                "fast-path name set full (%d names): %s; search-path junk is answered in "
                "userspace from now on",
                self.capacity,
                exc,
            )
            self._switch(False)
            return False
        return True

    def _switch(self, on: bool) -> None:
        v = maps.FpJunk()
        if on and len(self.nxdomain.body) > maps.FP_BODY_MAX:
            on = False  # a zone name so long that its SOA does not fit: the resolver's job
        if on:
            suffix = wire.encode_name(self.zone)
            v.suffix_len = len(suffix)
            ct.memmove(v.suffix, suffix, len(suffix))
            pods = wire.encode_name(self.pods)
            v.pod_suffix_len = len(pods)
            ct.memmove(v.pod_suffix, pods, len(pods))
            v.nxdomain = answer_value(self.nxdomain)
        self.junk.put(ct.c_uint32(0), v)
        self.on = on


def _name_key(name: str) -> maps.FpName | None:
    try:
        raw = wire.encode_name(name)
    except ValueError:
        return None  # no query can carry it in the kernel's key form either
    if len(raw) > maps.FP_NAME_MAX - 1:
        return None
    k = maps.FpName()
    ct.memmove(k.name, raw, len(raw))
    return k


@dataclass(frozen=True)
class CachedReply:
    """One cache entry as the kernel answers it (see struct fp_cached)."""

    name: bytes
    """The question name, lowercased wire form."""
    qtype: int
    flags: int
    """maps.FP_CK_EDNS | maps.FP_CK_CD: the queries whose cached reply this is."""
    server: str
    """The server a pod must have asked; "" for any."""
    message: bytes
    """The cached reply (ID zero), its TTLs as cached."""
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    """CLOCK_MONOTONIC seconds (time.monotonic, the clock of bpf_ktime_get_ns)."""
    expires: float
    due: float
    """The kernel answers until then; the last tenth of the entry's life is the
    resolver's, so that it sees the name and can refresh it."""


def encode_cached(reply: CachedReply) -> tuple[maps.FpCachedKey, maps.FpCached] | None:
    """The FP_CACHE entry for a cached reply, or None when it does not fit the kernel's
    slots (a long name, a big body, too many records)."""
    qend = 12 + len(reply.name) + 4
    body = reply.message[qend:]
    if (
        len(reply.name) > maps.FP_NAME_MAX - 1
        or len(body) > maps.FP_BODY_MAX
        or len(reply.ttls) > maps.FP_TTL_MAX
        or reply.message[12 : qend - 4].lower() != reply.name
        or any(off < qend or off + 4 > len(reply.message) for off in reply.ttl_offsets)
    ):
        return None
    k = maps.FpCachedKey()
    ct.memmove(k.name, reply.name, len(reply.name))
    k.qtype = _wire16(reply.qtype)
    k.flags = reply.flags
    if reply.server:
        k.family = maps.family_of(reply.server)
        k.server = maps.IpAddr.of(reply.server)
    v = maps.FpCached()
    v.stored_ns = int(reply.stored * 1e9)
    v.expires_ns = int(reply.expires * 1e9)
    v.due_ns = int(reply.due * 1e9)
    v.nttl = len(reply.ttls)
    for i, (off, ttl) in enumerate(zip(reply.ttl_offsets, reply.ttls, strict=True)):
        v.ttl[i] = ttl
        v.ttl_off[i] = off - qend
    msg = reply.message  # verbatim: the upstream's header bits and counts
    v.ans = _slot(msg[2], msg[3], struct.unpack_from("!HHH", msg, 6), body)
    return k, v


class CachedAnswers:
    """Writes hot cache entries into the pinned FP_CACHE map, at most ``capacity`` at once.

    An entry stays until its due time (then the kernel no longer answers it, and a sweep
    removes it), until a fresher copy of it replaces it, or until a flush (the routes or the
    mesh changed, so every cached answer must be looked at again by the resolver).  When the
    map is full, new entries wait for room: entries already down are never pushed out by
    newer ones, so the churn is bounded by the names' TTLs."""

    def __init__(self, pinned: PinnedMap, capacity: int) -> None:  # type: ignore[type-arg]
        self.map = pinned
        self.capacity = capacity
        self.held: dict[bytes, tuple[maps.FpCachedKey, float]] = {}
        """What the map holds: key bytes -> (key, due)."""
        self.pushed = 0
        self.full = 0
        """Entries that did not go down because the map was full."""
        self._full_log = RateLimitedLog(log, 60.0)

    def flush(self) -> None:
        """Empty the map, also of a previous agent's entries (their routes may not be ours)."""
        for k in list(self.map.keys()):
            self.map.delete(k)
        self.held.clear()

    def put(self, reply: CachedReply) -> Literal["pushed", "unfit", "full"]:
        """Hand one entry to the kernel: "pushed", or why not: it does not fit the kernel's
        slots (:func:`encode_cached`), or the map is full."""
        entry = encode_cached(reply)
        if entry is None:
            return "unfit"
        k, v = entry
        raw = bytes(k)
        if raw not in self.held and len(self.held) >= self.capacity:
            self.full += 1
            self._full_log.warning(
                "cached-full",
                "kernel cache full (%d names, --fastpath-cached): more hot names answered "
                "in userspace",
                self.capacity,
            )
            return "full"
        try:
            self.map.put(k, v)
        except InterceptorError as exc:
            self.full += 1
            self._full_log.warning("cached-full", "kernel cache refused an entry: %s", exc)
            return "full"
        self.held[raw] = (k, reply.due)
        self.pushed += 1
        return "pushed"

    def sweep(self, now: float | None = None) -> int:
        """Remove the entries the kernel no longer answers (past their due time)."""
        now = time.monotonic() if now is None else now
        gone = [raw for raw, (_, due) in self.held.items() if due <= now]
        for raw in gone:
            k, _ = self.held.pop(raw)
            self.map.delete(k)
        return len(gone)

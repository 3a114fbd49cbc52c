"""A shared cache of upstream answers for every pod on the node.

* Positive answers live for their smallest TTL, negative ones (NXDOMAIN, NODATA) for the SOA's
  min(TTL, MINIMUM) (RFC 2308 section 5), both clamped to [min_ttl, max_ttl].
* Served TTLs count down: the TTL fields' offsets are found once, at insert, and patched on
  the way out, at most once per entry and second (the patched copy is kept: a hot entry's
  hits cost a dictionary lookup and a slice, no parse and no render).
* Bounded by entries and by bytes, least recently used first out.
* Expired entries are kept ``stale_for`` seconds more, to be served (TTL 30 s, RFC 8767) only
  when every upstream fails.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from interceptor.dns.message import skip_name, walk_records

STALE_TTL = 30  # RFC 8767 section 4: the TTL of a stale answer


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stale_served: int = 0
    prefetches: int = 0


@dataclass
class Entry:
    message: bytes
    """The upstream reply with ID 0."""
    ttl_offsets: tuple[int, ...]
    """Offsets of every TTL field (OPT excluded)."""
    ttls: tuple[int, ...]
    stored: float
    expires: float
    hits: int = 0
    prefetching: bool = False
    checked: int = -1
    """The service map's mesh generation at which the careful path last found this name not
    ours (forwarded); the hot path serves the entry only while that still holds."""
    offered: bool = False
    """Offered to the kernel to answer (see :attr:`Cache.promotions`)."""
    size: int = field(init=False)
    rendered: bytes = field(init=False, repr=False)
    """``message`` with the TTLs of :attr:`rendered_for`."""
    rendered_for: tuple[int, int] = field(init=False, repr=False)
    """(age, seconds left) that :attr:`rendered` was patched for."""

    def __post_init__(self) -> None:
        self.size = len(self.message) + 64
        self.rendered = self.message
        self.rendered_for = (-1, -1)

    @property
    def due(self) -> float:
        """When the last tenth of the entry's life begins: from then on only the careful
        path serves it, so that a popular one is refreshed (:meth:`Cache.claim_prefetch`)."""
        return self.expires - (self.expires - self.stored) * 0.1

    def render(self, age: int, left: int) -> bytes:
        """The message with every TTL counted down by ``age`` and capped at ``left``."""
        if self.rendered_for != (age, left):
            self.rendered = self.with_ttls(max(0, min(ttl - age, left)) for ttl in self.ttls)
            self.rendered_for = (age, left)
        return self.rendered

    def with_ttls(self, ttls: Iterable[int]) -> bytes:
        """The message with its TTL fields set to ``ttls``, in order."""
        out = bytearray(self.message)
        for off, ttl in zip(self.ttl_offsets, ttls, strict=True):
            struct.pack_into("!I", out, off, ttl)
        return bytes(out)


def ttl_fields(msg: bytes) -> tuple[list[int], list[int], int | None]:
    """(TTL offsets, TTL values, negative TTL from an SOA in authority or None).  Raises
    ValueError/IndexError/struct.error on a malformed message."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", msg, 4)
    i = 12
    for _ in range(qd):
        i = skip_name(msg, i) + 4
    if i > len(msg):
        raise ValueError("truncated message")
    offsets: list[int] = []
    values: list[int] = []
    negative: int | None = None
    for section, count in ((0, an), (1, ns), (2, ar)):
        for fixed, end in walk_records(msg, i, count):
            rtype, _, ttl = struct.unpack_from("!HHI", msg, fixed)
            if rtype != 41:  # OPT's "TTL" is flags
                offsets.append(fixed + 4)
                values.append(ttl)
            if section == 1 and rtype == 6:  # SOA: MINIMUM is the rdata's last 4 bytes
                (minimum,) = struct.unpack_from("!I", msg, end - 4)
                negative = min(ttl, minimum)
            i = end
    return offsets, values, negative


class Cache:
    def __init__(
        self,
        max_entries: int = 10000,
        max_bytes: int = 64 << 20,
        min_ttl: int = 0,
        max_ttl: int = 3600,
        negative_ttl: int = 30,
        stale_for: float = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.stale_for = stale_for
        self.clock = clock
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()
        self.promote_hits = 0
        """Hits after which a hot-path entry is offered to the kernel (0: never)."""
        self.promotions: dict[bytes, None] = {}
        """Keys offered to the kernel, oldest first: entries that reached
        :attr:`promote_hits`, and fresh replacements of entries the kernel had.  The agent
        takes them (an ordered set: a key is offered once however often it is hit)."""

    def put(self, key: bytes, reply: bytes, checked: int = -1) -> None:
        """Cache an upstream reply (NOERROR or NXDOMAIN, not truncated); others are ignored.
        ``checked``: see :attr:`Entry.checked`."""
        if len(reply) < 12 or reply[2] & 0x02:
            return
        rcode = reply[3] & 0x0F
        if rcode not in (0, 3):
            return  # SERVFAIL, REFUSED...: never cached
        try:
            offsets, values, negative = ttl_fields(reply)
        except (ValueError, IndexError, struct.error):
            return
        an = struct.unpack_from("!H", reply, 6)[0]
        if rcode == 0 and an:
            ttl = min(values[:an]) if values else 0
        else:
            ttl = negative if negative is not None else self.negative_ttl
        ttl = max(self.min_ttl, min(self.max_ttl, ttl))
        if ttl <= 0:
            return
        now = self.clock()
        entry = Entry(b"\x00\x00" + reply[2:], tuple(offsets), tuple(values), now, now + ttl)
        entry.checked = checked
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
            if old.offered and self.promote_hits:
                self.promotions[key] = None  # a refresh (a prefetch): the kernel's again
        self.entries[key] = entry
        self.bytes += entry.size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            _, gone = self.entries.popitem(last=False)
            self.bytes -= gone.size
            self.stats.evictions += 1

    def get(self, key: bytes, stale: bool = False) -> tuple[bytes, Entry] | None:
        """A fresh reply with TTLs counted down (ID zero); with ``stale``, also an expired
        one within the stale window, with TTL 30."""
        entry = self.entries.get(key)
        now = self.clock()
        if entry is None:
            if not stale:
                self.stats.misses += 1
            return None
        if now >= entry.expires:
            if now >= entry.expires + self.stale_for:
                del self.entries[key]
                self.bytes -= entry.size
                entry = None
            if not stale or entry is None:
                if not stale:
                    self.stats.misses += 1
                return None
            self.stats.stale_served += 1
            return entry.with_ttls(STALE_TTL for _ in entry.ttls), entry
        self.entries.move_to_end(key)
        entry.hits += 1
        self.stats.hits += 1
        return entry.render(int(now - entry.stored), int(entry.expires - now)), entry

    def hot(self, key: bytes, generation: int) -> tuple[bytes, float, Entry] | None:
        """The hot path's lookup: a fresh reply (ID zero) with the moment it stops being the
        answer (a TTL ticks over, or the last tenth of the entry's life begins), else None
        and nothing counted.  The careful path serves what this declines: an entry in its
        last tenth (where a popular one is refreshed, see :meth:`claim_prefetch`), or one
        whose name must be checked again since the mesh changed."""
        entry = self.entries.get(key)
        if entry is None or entry.checked != generation or entry.prefetching:
            return None
        now = self.clock()
        expires = entry.expires
        due = entry.due
        if now >= due:
            return None
        age = int(now - entry.stored)
        left = int(expires - now)
        # The rendered TTLs hold while neither the age nor the seconds left tick over.
        until = min(due, entry.stored + age + 1, expires - left)
        self.entries.move_to_end(key)
        self.count_hit(key, entry)
        return entry.render(age, left), until, entry

    def count_hit(self, key: bytes, entry: Entry) -> None:
        """A hot-path hit on ``entry``: counted, and the entry offered to the kernel once it
        is hot.  The resolver's memo calls it for the hits it answers itself; recency is
        refreshed only by :meth:`hot` (at least once a second for a hot name), so LRU order
        holds to the second without a move per hit."""
        entry.hits += 1
        self.stats.hits += 1
        if self.promote_hits and not entry.offered and entry.hits >= self.promote_hits:
            self.promotions[key] = None

    def has_stale(self, key: bytes) -> bool:
        """Whether an expired answer for ``key`` could still be served (nothing counted)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        now = self.clock()
        return entry.expires <= now < entry.expires + self.stale_for

    def claim_prefetch(self, entry: Entry, min_hits: int = 2) -> bool:
        """Whether to refresh ``entry`` ahead of expiry now (a popular entry in the last 10%
        of its lifetime, not being refreshed already); a True claims and counts it."""
        if entry.prefetching or entry.hits < min_hits:
            return False
        life = entry.expires - entry.stored
        if self.clock() < entry.expires - life * 0.1:
            return False
        entry.prefetching = True
        self.stats.prefetches += 1
        return True

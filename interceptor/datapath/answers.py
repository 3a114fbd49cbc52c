"""The in-kernel fast path's answer map (FP_ANSWERS), kept in step with the service map.

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
from collections.abc import Callable, Iterable, Mapping

from interceptor.datapath import maps
from interceptor.datapath.bpfsys import PinnedMap
from interceptor.dns import wire
from interceptor.dns.message import Answer
from interceptor.errors import InterceptorError
from interceptor.logutil import RateLimitedLog

log = logging.getLogger(__name__)

FASTPATH_QTYPES = frozenset({wire.A, wire.AAAA})


def encode(key: bytes, answer: Answer) -> tuple[maps.FpKey, maps.FpAnswer] | None:
    """The map entry for one table entry, or None when it is not for the fast path."""
    name, qtype = key[:-2], struct.unpack("!H", key[-2:])[0]
    if qtype not in FASTPATH_QTYPES:
        return None
    if len(name) > maps.FP_NAME_MAX - 1 or len(answer.body) > maps.FP_BODY_MAX:
        return None  # the kernel key needs the root label's zero inside FP_NAME_MAX
    k = maps.FpKey()
    ct.memmove(k.name, name, len(name))
    k.qtype = int.from_bytes(key[-2:], "little")  # the bytes as they are on the wire
    return k, answer_value(answer)


def answer_value(answer: Answer) -> maps.FpAnswer:
    """An answer as the kernel stores it; its body must fit FP_BODY_MAX (the callers check:
    a longer one would be written past the slot)."""
    if len(answer.body) > maps.FP_BODY_MAX:
        raise ValueError(f"answer body of {len(answer.body)} bytes exceeds a kernel slot")
    v = maps.FpAnswer()
    v.flag_hi = answer.flag_hi
    v.flag_lo = answer.flag_lo
    # Counts go in network order: the program copies them into the header as they are.
    v.an, v.ns, v.ar = (_wire16(n) for n in (answer.an, answer.ns, answer.ar))
    v.len = len(answer.body)
    ct.memmove(v.body, answer.body, len(answer.body))
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
            self._put(k, v)
        return len(wanted) - self.skipped

    def apply(self, table: Mapping[bytes, Answer], changed: Iterable[bytes]) -> None:
        """Bring the entries of ``changed`` table keys in step (a service map event)."""
        for key in changed:
            answer = table.get(key)
            entry = encode(key, answer) if answer is not None else None
            if entry is not None:
                self._put(*entry)
                continue
            k = _key_only(key)
            if k is not None:
                self.map.delete(k)

    def _put(self, k: maps.FpKey, v: maps.FpAnswer) -> None:
        try:
            self.map.put(k, v)
        except InterceptorError as exc:
            # Full (E2BIG/ENOMEM): the resolver answers this name; nothing is lost.
            self.skipped += 1
            self._full_log.warning(
                "fastpath-full",
                "fast-path map full (%d entries): %s; more names answered in userspace",
                self.capacity,
                exc,
            )


def _wire16(n: int) -> int:
    """The host-order u16 whose memory bytes are ``n`` in network order."""
    return int.from_bytes(struct.pack("!H", n), "little")


def _key_only(key: bytes) -> maps.FpKey | None:
    name = key[:-2]
    if len(name) > maps.FP_NAME_MAX - 1:
        return None
    k = maps.FpKey()
    ct.memmove(k.name, name, len(name))
    k.qtype = int.from_bytes(key[-2:], "little")
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

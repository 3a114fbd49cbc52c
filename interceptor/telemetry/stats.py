"""Request and upstream figures, kept as plain ints and dicts on the event loop's thread.

The resolver answers ~125k queries per second on its hot path, where a prometheus-client
``Counter.labels(...).inc()`` per query (a lock, a label lookup) would cost more than the
answer itself.  So the hot path only bumps a dict entry, and :mod:`interceptor.telemetry.prometheus`
turns these into metric families when Prometheus scrapes (a custom collector).  A scrape runs
on another thread: it copies each dict first (``dict.copy`` holds the GIL throughout).
"""

from __future__ import annotations

from bisect import bisect_left

from interceptor.dns.codes import RRType, rcode_text, type_text

DURATION_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds (seconds).  From 100 µs: a node-local answer takes tens of microseconds, a
forwarded one a millisecond or more, a timed-out one seconds."""
FIRST_BOUND = DURATION_BUCKETS[0]

LABELLED_TYPES = frozenset(
    int(t)
    for t in (
        RRType.A, RRType.NS, RRType.CNAME, RRType.SOA, RRType.PTR, RRType.MX, RRType.TXT,
        RRType.AAAA, RRType.SRV, RRType.NAPTR, RRType.DS, RRType.DNSKEY, RRType.SVCB,
        RRType.HTTPS, RRType.SPF, RRType.AXFR, RRType.IXFR, RRType.ANY, RRType.CAA,
    )
)  # fmt: skip
"""Types with their own label value; every other type is ``other``: the type is chosen by the
client, and 65536 label values would be a cardinality bomb."""

NAMED_RCODES = 6
"""Header RCODEs below this get their name as the label; the rest (rare, and BADVERS, which
is extended) their number, as they always have."""

SOURCES = ("authoritative", "mesh", "cache", "upstream", "stale", "error")
"""Where an answer came from (the ``source`` label)."""

MAX_UPSTREAM_LABELS = 64
"""Distinct upstream servers given their own label; the rest share ``other``.  With
``--capture-all`` a pod may ask any address, and each would otherwise be a new series."""


def qtype_label(qtype: int) -> str:
    return type_text(qtype) if qtype in LABELLED_TYPES else "other"


def rcode_label(rcode: int) -> str:
    return rcode_text(rcode) if 0 <= rcode < NAMED_RCODES else str(rcode)


class Histogram:
    """Bucket counts (non-cumulative; the collector accumulates) and the sum of observations."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        if seconds <= FIRST_BOUND:  # a node-local answer, nearly always: no bucket search
            self.counts[0] += n
        else:
            # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
            self.counts[bisect_left(DURATION_BUCKETS, seconds)] += n
        self.total += seconds * n

    def snapshot(self) -> tuple[list[int], float]:
        return list(self.counts), self.total


class RequestStats:
    """What the resolver answered, by protocol, question type, RCODE and source."""

    def __init__(self) -> None:
        self.answered: dict[tuple[str, int, int, str], int] = {}
        """(proto, qtype, rcode, source) -> count, for the careful path."""
        self.fast: dict[bytes, int] = {}
        """Hot-path answers keyed by raw bytes (the QTYPE, plus ``b"m"`` for mesh hosts):
        cheaper to build per query than a tuple of decoded fields; decoded at scrape time."""
        self.durations: dict[str, Histogram] = {s: Histogram() for s in SOURCES}
        self.autopath: dict[str, int] = {"hit": 0, "miss": 0}
        self.tcp_refused: dict[str, int] = {}
        """TCP connections closed at accept, by reason (client_limit, limit), and ones
        closed to make room for a client with fewer (evicted)."""
        self.client_dropped: dict[str, int] = {}
        """Careful-path queries dropped unstarted, by reason (resolve/fair.py): ``full``,
        their client had too many waiting; ``expired``, one waited past its client's
        patience."""
        self.not_allowed = 0
        """Queries refused because the server the pod asked is not an allowed target."""

    def fast_batch(self, answered: int, mesh: int, seconds: float, cached: int = 0) -> None:
        """``answered`` hot-path answers (``mesh`` of them for mesh hosts, ``cached`` from
        the cache), each timed as its batch's time over the batch's queries: timing every
        answer would cost more than answering it."""
        if mesh:
            self.durations["mesh"].observe(seconds, mesh)
        if cached:
            self.durations["cache"].observe(seconds, cached)
        if answered > mesh + cached:
            self.durations["authoritative"].observe(seconds, answered - mesh - cached)

    def autopath_result(self, hit: bool) -> None:
        self.autopath["hit" if hit else "miss"] += 1

    def tcp_refusal(self, reason: str) -> None:
        self.tcp_refused[reason] = self.tcp_refused.get(reason, 0) + 1

    def client_drop(self, reason: str) -> None:
        self.client_dropped[reason] = self.client_dropped.get(reason, 0) + 1

    def count(self, proto: str, qtype: int, rcode: int, source: str, seconds: float) -> None:
        key = (proto, qtype, rcode, source)
        self.answered[key] = self.answered.get(key, 0) + 1
        self.durations[source].observe(seconds)

    def totals(self) -> dict[tuple[str, str, str, str], int]:
        """(proto, qtype label, rcode label, source) -> count: both paths merged."""
        out: dict[tuple[str, str, str, str], int] = {}
        for (proto, qtype, rcode, source), n in self.answered.copy().items():
            key = (proto, qtype_label(qtype), rcode_label(rcode), source)
            out[key] = out.get(key, 0) + n
        for raw, n in self.fast.copy().items():
            # QTYPE, then: nothing (authoritative NOERROR), "m" (mesh, NOERROR), "a" and the
            # RCODE (authoritative), "c" and the RCODE (cache).  See Resolver.fast.
            qlabel = qtype_label(int.from_bytes(raw[:2], "big"))
            if raw[2:3] == b"c":
                label = ("udp", qlabel, rcode_label(raw[3]), "cache")
            elif raw[2:3] == b"a":
                label = ("udp", qlabel, rcode_label(raw[3]), "authoritative")
            else:
                source = "mesh" if raw[2:] == b"m" else "authoritative"
                label = ("udp", qlabel, "NOERROR", source)
            out[label] = out.get(label, 0) + n
        return out


class UpstreamStats:
    """Attempts per upstream server and how they ended (ok, timeout, error, truncated), and
    how long they took."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.tcp_connects: dict[str, int] = {}
        """TCP connections opened per server (the pool's reuse is visible against attempts)."""

    def label(self, server: str) -> str:
        if server in self.durations or len(self.durations) < MAX_UPSTREAM_LABELS:
            return server
        return "other"

    def record(self, server: str, outcome: str, seconds: float) -> None:
        label = self.label(server)
        key = (label, outcome)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        hist = self.durations.get(label)
        if hist is None:
            hist = self.durations[label] = Histogram()
        hist.observe(seconds)

    def connected(self, server: str) -> None:
        label = self.label(server)
        self.tcp_connects[label] = self.tcp_connects.get(label, 0) + 1

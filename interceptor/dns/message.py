"""DNS messages: the fast question scan, the careful parse, and response assembly.

A response is ``header + the query's own question bytes + a precomputed body``.  Copying the
question verbatim keeps the client's case (and 0x20 randomisation) intact, and the body's
owner names point at it (``QNAME_POINTER``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from interceptor.dns.wire import (
    BADVERS,
    CLASS_IN,
    FORMERR,
    NOERROR,
    NOTIMP,
    OPT,
    decode_name_plain,
    encode_name,
    table_key,
)
from interceptor.settings import DEFAULT_MAX_UDP

HEADER = struct.Struct("!HHHHHH")

# Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2 for AD/CD).
QR, AA, TC, RD = 0x8000, 0x0400, 0x0200, 0x0100
RA, CD = 0x0080, 0x0010

# Counts of a plain query: QD=1, AN=0, NS=0, AR=0 / AR=1 (an OPT record).
COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
OPT_HEAD = b"\x00\x00\x29"  # root owner name + TYPE 41
DO_BIT = 0x8000


_COUNTS: dict[tuple[int, int, int], bytes] = {}


def _interned_counts(an: int, ns: int, ar: int) -> bytes:
    """Header counts as wire bytes, one shared object per distinct value: most answers have
    the same few counts, and 100k services would otherwise carry 200k copies."""
    key = (an, ns, ar)
    out = _COUNTS.get(key)
    if out is None:
        out = _COUNTS.setdefault(key, struct.pack("!HHHH", 1, an, ns, ar))
    return out


class Answer:
    """A precomputed response body for one (name, type), or a negative answer template.

    ``body`` holds the answer, authority and additional sections, with ``an``/``ns``/``ar``
    records in them.  The question is not part of it: it is copied from the query at send
    time.  The header bytes that do not depend on the query are precomputed too.
    """

    __slots__ = (
        "rcode",
        "authoritative",
        "an",
        "ns",
        "ar",
        "body",
        "flag_hi",
        "flag_lo",
        "counts_plain",
        "counts_edns",
    )

    def __init__(
        self, rcode: int, authoritative: bool, an: int, ns: int, ar: int, body: bytes
    ) -> None:
        self.rcode = rcode
        self.authoritative = authoritative
        self.an = an
        self.ns = ns
        self.ar = ar
        self.body = body
        # Second and third header bytes before the query's RD and CD bits are or-ed in.
        self.flag_hi = (QR | (AA if authoritative else 0)) >> 8
        self.flag_lo = RA | (rcode & 0xF)
        self.counts_plain = _interned_counts(an, ns, ar)
        self.counts_edns = _interned_counts(an, ns, ar + 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Answer) and (
            (self.rcode, self.authoritative, self.an, self.ns, self.ar, self.body)
            == (other.rcode, other.authoritative, other.an, other.ns, other.ar, other.body)
        )

    def __hash__(self) -> int:
        return hash((self.rcode, self.body))

    def __repr__(self) -> str:
        return (
            f"Answer(rcode={self.rcode}, aa={self.authoritative}, an={self.an}, "
            f"ns={self.ns}, ar={self.ar}, {len(self.body)} bytes)"
        )


@dataclass(frozen=True, slots=True)
class Edns:
    """The client's OPT record (RFC 6891 6.1.2), the parts a server must act on."""

    udp_size: int
    version: int
    do: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed, well-formed one-question query."""

    data: bytes
    id: int
    flags: int
    qname: str
    """Lowercased, without the trailing dot; ``""`` is the root."""
    qname_wire: bytes
    """Lowercased wire form of the name (the table key without the type)."""
    qtype: int
    qclass: int
    question_end: int
    """Offset just past QTYPE/QCLASS: ``data[12:question_end]`` is the question as sent."""
    edns: Edns | None

    @property
    def key(self) -> bytes:
        return table_key(self.qname_wire, self.qtype)


class Malformed(Exception):
    """The message cannot be answered normally; ``rcode`` says how to reply (None: drop it)."""

    def __init__(self, reason: str, rcode: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rcode = rcode


def parse_query(data: bytes) -> Query:
    """Parse a query carefully.  Raises :class:`Malformed` with the rcode to answer with."""
    if len(data) < 12:
        raise Malformed("shorter than a DNS header", None)
    msg_id, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        # Never answer a response: that is how reflection loops start.
        raise Malformed("a response, not a query", None)
    opcode = (flags >> 11) & 0xF
    if opcode != 0:
        raise Malformed(f"opcode {opcode} is not QUERY", NOTIMP)
    if qd != 1:
        raise Malformed(f"{qd} questions (RFC 9619: exactly one)", FORMERR)
    if an or ns:
        raise Malformed("answer or authority records in a query", FORMERR)
    try:
        qname, end = decode_name_plain(data, 12)
    except (ValueError, IndexError) as exc:
        raise Malformed(f"bad question name: {exc}", FORMERR) from exc
    if end + 4 > len(data):
        raise Malformed("question truncated", FORMERR)
    qtype, qclass = struct.unpack_from("!HH", data, end)
    qend = end + 4
    edns = None
    if ar:
        edns = _parse_additional(data, qend, ar)
    elif qend != len(data):
        raise Malformed("trailing bytes after the question", FORMERR)
    lowered = qname.lower()
    return Query(data, msg_id, flags, lowered, data[12:end].lower(), qtype, qclass, qend, edns)


def _parse_additional(data: bytes, offset: int, count: int) -> Edns | None:
    """Walk the additional section; return the OPT record if there is exactly one."""
    edns: Edns | None = None
    for _ in range(count):
        try:
            offset = skip_name(data, offset)
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, offset)
        except (ValueError, IndexError, struct.error) as exc:
            raise Malformed("bad additional record", FORMERR) from exc
        offset += 10 + rdlen
        if offset > len(data):
            raise Malformed("additional record truncated", FORMERR)
        if rtype == OPT:
            if edns is not None:
                raise Malformed("more than one OPT record (RFC 6891 6.1.1)", FORMERR)
            edns = Edns(
                udp_size=max(rclass, 512), version=(ttl >> 16) & 0xFF, do=bool(ttl & DO_BIT)
            )
    if offset != len(data):
        raise Malformed("trailing bytes after the additional section", FORMERR)
    return edns


def skip_name(data: bytes, offset: int) -> int:
    """The offset just past a (possibly compressed) name.  Raises IndexError/ValueError."""
    while True:
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length > 63:
            raise ValueError("extended label")
        offset += length + 1


def question_end(msg: bytes) -> int:
    """Offset just past the first question of a message.  Raises ValueError/IndexError."""
    return skip_name(msg, 12) + 4


def build_query(
    name: str, qtype: int, udp_size: int | None = DEFAULT_MAX_UDP, qid: int = 0
) -> bytes:
    """A recursive query (RD) for (name, IN, qtype), with EDNS unless ``udp_size`` is None:
    the resolver's own lookups, the admin's ``query`` and the health check all ask with it."""
    question = encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    if udp_size is None:
        return HEADER.pack(qid, RD, 1, 0, 0, 0) + question
    return HEADER.pack(qid, RD, 1, 0, 0, 1) + question + opt_record(udp_size, False)


def opt_record(udp_size: int, do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT RR: our UDP payload size, version 0, the DO bit copied (RFC 3225 3)."""
    return OPT_HEAD + struct.pack("!HBBHH", udp_size, ext_rcode, 0, DO_BIT if do else 0, 0)


def response_flags(
    query_flags: int, rcode: int, authoritative: bool, truncated: bool = False
) -> int:
    """QR set, opcode 0, RD and CD copied (RFC 1035 4.1.1, RFC 6840 5.9), RA set."""
    flags = QR | RA | (query_flags & (RD | CD)) | (rcode & 0xF)
    if authoritative:
        flags |= AA
    if truncated:
        flags |= TC
    return flags


def assemble(query: Query, answer: Answer, max_udp: int, limit: int | None) -> bytes:
    """Response to ``query`` from a precomputed ``answer``.

    ``limit`` is the largest message the client can take (None over TCP); a bigger response
    is cut down to fit as RFC 2181 section 9 says (see :func:`fit`).
    """
    data = query.data
    edns = query.edns
    opt = opt_record(max_udp, edns.do) if edns is not None else b""
    ar = answer.ar + (1 if edns is not None else 0)
    question = data[12 : query.question_end]
    flags = response_flags(query.flags, answer.rcode, answer.authoritative)
    header = HEADER.pack(query.id, flags, 1, answer.an, answer.ns, ar)
    out = header + question + answer.body + opt
    if limit is not None and len(out) > limit:
        return fit(out, limit, opt)
    return out


def walk_records(msg: bytes, offset: int, count: int) -> Iterator[tuple[int, int]]:
    """For each of ``count`` records from ``offset``: where its TYPE field starts and where
    the record ends.  Raises ValueError, IndexError or struct.error on a bad one."""
    for _ in range(count):
        fixed = skip_name(msg, offset)
        (rdlength,) = struct.unpack_from("!H", msg, fixed + 8)
        offset = fixed + 10 + rdlength
        if offset > len(msg):
            raise ValueError("record runs past the message")
        yield fixed, offset


def fit(msg: bytes, limit: int, opt: bytes) -> bytes:
    """A response too big for the client, cut down as RFC 2181 section 9 says.

    The additional section goes first (no TC: nothing required is missing), then the
    authority section; only when the answer section itself does not fit is TC set, with as
    many whole answer records as fit (as CoreDNS does: a stub that never retries over TCP,
    such as musl before 1.2.4, still gets addresses).  ``opt`` is our OPT record, kept last.
    Names are compressed only backwards, so a cut message stays valid.
    """
    msg_id, flags, qd, an, ns, _ = HEADER.unpack_from(msg)
    extra = 1 if opt else 0
    room = limit - len(opt)
    try:
        start = question_end(msg) if qd else 12
    except (ValueError, IndexError):
        return HEADER.pack(msg_id, flags | TC, 0, 0, 0, extra) + opt
    try:
        answers = [start, *(end for _, end in walk_records(msg, start, an))]
        authority = [end for _, end in walk_records(msg, answers[-1], ns)]
    except (ValueError, IndexError, struct.error):
        # Records we cannot walk cannot be cut: the question alone, and TC for a retry.
        head = HEADER.pack(msg_id, flags | TC, qd, 0, 0, extra)
        return head + msg[12:start] + opt
    if authority and authority[-1] <= room:
        return HEADER.pack(msg_id, flags, qd, an, ns, extra) + msg[12 : authority[-1]] + opt
    if answers[-1] <= room:
        return HEADER.pack(msg_id, flags, qd, an, 0, extra) + msg[12 : answers[-1]] + opt
    kept = 0
    while kept < an and answers[kept + 1] <= room:
        kept += 1
    head = HEADER.pack(msg_id, flags | TC, qd, kept, 0, extra)
    return head + msg[12 : answers[kept]] + opt


def error_response(
    data: bytes, rcode: int, query: Query | None = None, max_udp: int = DEFAULT_MAX_UDP
) -> bytes | None:
    """A bodyless response with ``rcode``; with the question when the query parsed.

    Returns None when there is not even a header to answer.
    """
    if len(data) < 12:
        return None
    if query is not None:
        edns = query.edns
        opt = b""
        if edns is not None:
            opt = opt_record(max_udp, edns.do, ext_rcode=rcode >> 4)
        flags = response_flags(query.flags, rcode, authoritative=False)
        header = HEADER.pack(query.id, flags, 1, 0, 0, 1 if opt else 0)
        return header + data[12 : query.question_end] + opt
    msg_id, qflags = struct.unpack_from("!HH", data)
    # Opcode is echoed so the client can match a NOTIMP to what it sent.
    flags = QR | (qflags & 0x7800) | (qflags & RD) | (rcode & 0xF)
    return HEADER.pack(msg_id, flags, 0, 0, 0, 0)


def badvers_response(query: Query, max_udp: int) -> bytes:
    """RFC 6891 6.1.3: an unsupported EDNS version gets BADVERS with our version (0)."""
    assert query.edns is not None
    opt = opt_record(max_udp, query.edns.do, ext_rcode=BADVERS >> 4)
    flags = response_flags(query.flags, BADVERS & 0xF, authoritative=False)
    header = HEADER.pack(query.id, flags, 1, 0, 0, 1)
    return header + query.data[12 : query.question_end] + opt


def cap_edns(query: Query, max_udp: int) -> bytes:
    """The query as sent upstream.  With EDNS, its OPT record is ours: the client's payload
    size capped at ``max_udp`` (an upstream never sends a fragmented answer we would have to
    carry: DNS flag day 2020), its DO bit, and no options.  Options are hop-by-hop (RFC 6891
    6.1.1): a client's COOKIE sent on would come back in a reply the cache then serves to
    other clients, whose resolvers reject it (RFC 7873; found on the real node: dig's "Client
    COOKIE mismatch")."""
    data = query.data
    edns = query.edns
    if edns is None:
        return data
    q = query.question_end
    plain = data[q:] == opt_record(edns.udp_size, edns.do)
    if plain and edns.udp_size <= max_udp:
        return data
    return data[:10] + b"\x00\x01" + data[12:q] + opt_record(min(edns.udp_size, max_udp), edns.do)


def udp_limit(edns: Edns | None, max_udp: int) -> int:
    """Largest UDP response this client can take: 512 without EDNS (RFC 1035 4.2.1)."""
    if edns is None:
        return 512
    return max(512, min(edns.udp_size, max_udp))


_OPT_CACHE: dict[tuple[int, bool], bytes] = {}
"""Our OPT record by (payload size, DO bit): the hot path must not pack it per query."""


NO_EDNS, EDNS, EDNS_DO = 0, 1, 3
"""What :func:`plain_tail` found after the question (bit 0: an OPT record, bit 1: DO)."""


def plain_tail(data: bytes, qend: int, max_udp: int) -> tuple[int, int] | None:
    """For a one-question query whose question ends at ``qend``: (the largest response the
    client takes, :data:`NO_EDNS` / :data:`EDNS` / :data:`EDNS_DO`), when the rest of the
    message is nothing or exactly one well-formed OPT record of EDNS version 0; else None
    (the careful path decides: BADVERS, FORMERR ...).  The hot paths' one parse of it."""
    counts = data[4:12]
    if counts == COUNTS_PLAIN:
        return (512, NO_EDNS) if len(data) == qend else None
    if counts != COUNTS_EDNS:
        return None
    # OPT: root name, type 41, payload size, ext-rcode, version, flags, rdlen, options.
    if data[qend : qend + 3] != OPT_HEAD or data[qend + 6] != 0 or len(data) < qend + 11:
        return None
    if qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]) != len(data):
        return None
    limit = (data[qend + 3] << 8) | data[qend + 4]
    limit = 512 if limit < 512 else (max_udp if limit > max_udp else limit)
    return limit, EDNS_DO if data[qend + 7] & 0x80 else EDNS


def fast_response(data: bytes, table: dict[bytes, Answer], max_udp: int) -> bytes | None:
    """The hot path: answer a plain query from ``table`` without parsing it into objects.

    Returns None for anything it does not handle exactly (a miss, another class, options it
    does not understand, a response that would need truncation); the careful path then
    decides.  The first zero byte after the header ends the QNAME: a key hit proves the bytes
    before it are one of our names, whose labels contain no zero byte and whose length
    octets (<= 63) are untouched by ASCII lowercasing.
    """
    if len(data) < 17 or data[2] & 0xF8:
        return None
    z = data.find(0, 12)
    if z < 0:
        return None
    answer = table.get(data[12 : z + 1].lower() + data[z + 1 : z + 3])
    if answer is None:
        return None
    qend = z + 5
    if data[z + 3 : qend] != b"\x00\x01":
        return None
    shape = plain_tail(data, qend, max_udp)
    if shape is None:
        return None
    limit, edns = shape
    if edns == NO_EDNS:
        head = answer.counts_plain
        opt = b""
    else:
        head = answer.counts_edns
        do = edns == EDNS_DO
        cached = _OPT_CACHE.get((max_udp, do))
        if cached is None:
            cached = _OPT_CACHE.setdefault((max_udp, do), opt_record(max_udp, do))
        opt = cached
    body = answer.body
    if qend + len(body) + len(opt) > limit:
        return None
    return (
        data[:2]
        + bytes((answer.flag_hi | (data[2] & 0x01), answer.flag_lo | (data[3] & 0x10)))
        + head
        + data[12:qend]
        + body
        + opt
    )


__all__ = [
    "Answer",
    "Edns",
    "fast_response",
    "Malformed",
    "Query",
    "assemble",
    "badvers_response",
    "error_response",
    "parse_query",
    "opt_record",
    "response_flags",
    "udp_limit",
    "CLASS_IN",
    "NOERROR",
]

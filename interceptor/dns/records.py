"""Records of other servers' replies, re-encoded with dnslib: where correctness matters more
than speed (a reply's names may use compression, which cannot be spliced as it is)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dnslib

from interceptor.dns import wire


class _FlatBuffer(dnslib.DNSBuffer):  # type: ignore[misc]
    """No name compression: a record packed alone is spliced into another message, where a
    pointer to an offset of its own buffer would point into that message's header."""

    def encode_name(self, name: object) -> None:
        self.encode_name_nocompress(name)


def pack_rr(record: dnslib.RR) -> bytes:
    buf = _FlatBuffer()
    record.pack(buf)
    return bytes(buf.data)


@dataclass(frozen=True)
class Sections:
    """A reply's sections as standalone records (no OPT), its RCODE, AA and TTLs."""

    rcode: int
    aa: bool
    answer: list[bytes]
    authority: list[bytes]
    additional: list[bytes]
    answer_ttls: list[int]
    negative_ttls: list[int]
    """For each SOA in the authority section: min(its TTL, its MINIMUM) (RFC 2308)."""


def sections(reply: bytes) -> Sections | None:
    """The sections of a reply, or None if dnslib cannot parse it."""
    try:
        msg = dnslib.DNSRecord.parse(reply)
    except (dnslib.DNSError, ValueError, IndexError, struct.error):
        return None
    return Sections(
        rcode=msg.header.rcode,
        aa=bool(msg.header.aa),
        answer=[pack_rr(r) for r in msg.rr],
        authority=[pack_rr(r) for r in msg.auth],
        additional=[pack_rr(r) for r in msg.ar if r.rtype != wire.OPT],
        answer_ttls=[r.ttl for r in msg.rr],
        negative_ttls=[min(r.ttl, r.rdata.times[4]) for r in msg.auth if r.rtype == wire.SOA],
    )

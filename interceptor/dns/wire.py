"""Encoding of names and resource records (RFC 1035 section 3 and 4), without dnslib.

Everything here produces bytes that are precomputed once per record and reused for every
answer, so the hot path only concatenates.
"""

from __future__ import annotations

import ipaddress
import struct

from interceptor.dns.codes import Rcode, RRType

# Plain ints for the hot path (an IntEnum member compares more slowly); names: dns/codes.py.
A, NS, CNAME, SOA, PTR = (
    int(t) for t in (RRType.A, RRType.NS, RRType.CNAME, RRType.SOA, RRType.PTR)
)
MX, TXT, AAAA, SRV, OPT = (
    int(t) for t in (RRType.MX, RRType.TXT, RRType.AAAA, RRType.SRV, RRType.OPT)
)
IXFR, AXFR, ANY = int(RRType.IXFR), int(RRType.AXFR), int(RRType.ANY)
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL = int(Rcode.NOERROR), int(Rcode.FORMERR), int(Rcode.SERVFAIL)
NXDOMAIN, NOTIMP, REFUSED = int(Rcode.NXDOMAIN), int(Rcode.NOTIMP), int(Rcode.REFUSED)
BADVERS = int(Rcode.BADVERS)

# An owner name that is a compression pointer to offset 12: the question's QNAME.  Answers
# use it so that owner names echo the case the client asked in (RFC 4343 section 4.1).
QNAME_POINTER = b"\xc0\x0c"

MAX_NAME_WIRE = 255


class NameError_(ValueError):
    """The name cannot be encoded (label over 63 octets, name over 255, empty label)."""


def encode_name(name: str) -> bytes:
    """Wire form of a domain name, lowercased.  ``""`` and ``"."`` are the root."""
    name = name.rstrip(".").lower()
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        try:
            raw = label.encode("ascii")
        except UnicodeEncodeError:
            raise NameError_(f"non-ASCII label {label!r} in {name!r}") from None
        if not raw or len(raw) > 63:
            raise NameError_(f"bad label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME_WIRE:
        raise NameError_(f"name longer than 255 octets: {name!r}")
    return bytes(out)


def decode_name_plain(buf: bytes, offset: int) -> tuple[str, int]:
    """Decode an uncompressed name at ``offset``; return it (original case) and the end offset.

    Queries never need compression (RFC 1035 4.1.4 allows it, but no stub resolver sends a
    pointer in a one-question query); a pointer or extended label raises ``ValueError``.
    """
    labels: list[str] = []
    i = offset
    total = 0
    while True:
        length = buf[i]
        if length == 0:
            return ".".join(labels), i + 1
        if length > 63:
            raise ValueError("compressed or extended label in question")
        label = buf[i + 1 : i + 1 + length]
        if len(label) != length:
            raise ValueError("label runs past the end of the message")
        total += length + 1
        if total + 1 > MAX_NAME_WIRE:  # and the root label's zero octet
            raise ValueError("name longer than 255 octets")
        labels.append(label.decode("latin-1"))
        i += length + 1


def table_key(name: bytes, qtype: int) -> bytes:
    """The key of a name's answers of one type: its lowercased wire form, then the type in
    network order (the resolver's table, the kernel's copy, the map's record sets)."""
    return name + struct.pack("!H", qtype)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One resource record in wire form."""
    return owner + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


def rdata_address(ip: str) -> tuple[int, bytes]:
    """(A or AAAA, packed address) for an IP address string."""
    addr = ipaddress.ip_address(ip)
    return (A if addr.version == 4 else AAAA), addr.packed


def rdata_srv(priority: int, weight: int, port: int, target: str) -> bytes:
    # RFC 2782: the target name must not be compressed.
    return struct.pack("!HHH", priority, weight, port) + encode_name(target)


def rdata_txt(*strings: str) -> bytes:
    out = bytearray()
    for s in strings:
        raw = s.encode()
        out.append(len(raw))
        out += raw
    return bytes(out)


def rdata_soa(
    mname: str, rname: str, serial: int, refresh: int, retry: int, expire: int, minimum: int
) -> bytes:
    return (
        encode_name(mname)
        + encode_name(rname)
        + struct.pack("!IIIII", serial, refresh, retry, expire, minimum)
    )


def reverse_name(ip: str) -> str:
    """``d.c.b.a.in-addr.arpa`` or the nibble form under ``ip6.arpa`` (RFC 3596 2.5)."""
    return ipaddress.ip_address(ip).reverse_pointer


def dashed_ip(ip: str) -> str:
    """The dashed form used for pod and endpoint names: ``10-0-0-1``, ``fd00--1``."""
    return ipaddress.ip_address(ip).compressed.replace(".", "-").replace(":", "-")


def undash_ip(label: str) -> str | None:
    """Inverse of :func:`dashed_ip` for a single label; None if it is not an IP."""
    for candidate in (label.replace("-", "."), label.replace("-", ":")):
        try:
            return ipaddress.ip_address(candidate).compressed
        except ValueError:
            continue
    return None

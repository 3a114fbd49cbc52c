"""DNS numbers and their names: RR types and RCODEs, in one place.

Built like dnspython's ``rdatatype``/``rcode``: an IntEnum per kind, so a number prints as its
mnemonic, plus the two conversions the tools need (``type_code("aaaa")``, ``rcode_text(16)``).
The hot path compares plain ints; :mod:`interceptor.dns.wire` exports these members as ints.
"""

from __future__ import annotations

from enum import IntEnum


class RRType(IntEnum):
    """RR types (RFC 1035 3.2.2, RFC 3596, RFC 2782, RFC 6891, RFC 9460 ...)."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    NAPTR = 35
    OPT = 41
    DS = 43
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    SVCB = 64
    HTTPS = 65
    SPF = 99
    IXFR = 251
    AXFR = 252
    ANY = 255
    CAA = 257


class Rcode(IntEnum):
    """RCODEs (RFC 1035 4.1.1; BADVERS is extended, RFC 6891 6.1.3)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    YXDOMAIN = 6
    YXRRSET = 7
    NXRRSET = 8
    NOTAUTH = 9
    NOTZONE = 10
    BADVERS = 16


def type_text(code: int) -> str:
    """``1`` -> ``A``; a type without a mnemonic here is ``TYPE<n>`` (RFC 3597)."""
    try:
        return RRType(code).name
    except ValueError:
        return f"TYPE{code}"


def type_code(text: str) -> int:
    """``A``, ``aaaa``, ``TYPE65`` or ``65`` -> the type number; ValueError if unknown."""
    t = text.strip().upper()
    if t.isdigit():
        code = int(t)
    elif t.startswith("TYPE") and t[4:].isdigit():
        code = int(t[4:])
    elif t in RRType.__members__:
        return int(RRType[t])
    else:
        raise ValueError(f"unknown query type {text!r}")
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"query type {text!r} is out of range")
    return code


def rcode_text(code: int) -> str:
    """``3`` -> ``NXDOMAIN``; an unnamed RCODE is its number."""
    try:
        return Rcode(code).name
    except ValueError:
        return str(code)

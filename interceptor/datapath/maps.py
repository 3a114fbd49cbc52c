"""ctypes mirrors of the structs in bpf/lib/maps.h, and typed access to the pinned maps.

Each class's docstring names its C struct; tests/process/test_maps_abi.py compiles maps.h with
the host compiler and checks every size and offset against these mirrors.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
from dataclasses import dataclass

FAMILY_V4 = 4
FAMILY_V6 = 6

CFG_CAPTURE_ALL = 1 << 0
CFG_SK_LOOKUP = 1 << 1
CFG_CACHED_BY_SERVER = 1 << 2

FLOW_DIRECT = 1 << 0
FLOW_TCP_COUNTED = 1 << 1

MAX_PODS = 4096
MAX_FLOWS = 65536
MAX_CAPTURE = 64

# Keep in step with enum reason in bpf/lib/metrics.h.
REASONS = (
    "redirected",
    "reply_restored",
    "spoofed",
    "unknown_pod",
    "stale_heartbeat",
    "no_socket",
    "rate_limited",
    "no_flow",
    "not_captured",
    "csum_error",
    "malformed",
    "direct",
    "query_limited",
    "answer_limited",
    "tcp_limited",
)


class IpAddr(ct.Structure):
    """struct ip_addr"""

    _fields_ = [("a", ct.c_uint32 * 4)]

    @classmethod
    def of(cls, ip: str) -> IpAddr:
        packed = ipaddress.ip_address(ip).packed.ljust(16, b"\0")
        out = cls()
        ct.memmove(ct.addressof(out), packed, 16)
        return out

    def text(self, family: int) -> str:
        raw = bytes(self)
        if family == FAMILY_V4:
            return socket.inet_ntop(socket.AF_INET, raw[:4])
        return socket.inet_ntop(socket.AF_INET6, raw)


class Config(ct.Structure):
    """struct config"""

    _fields_ = [
        ("heartbeat_ns", ct.c_uint64),
        ("heartbeat_timeout", ct.c_uint64),
        ("resolver4", IpAddr),
        ("resolver6", IpAddr),
        ("flags", ct.c_uint32),
        ("flow_rate", ct.c_uint32),
        ("flow_burst", ct.c_uint32),
        ("max_udp", ct.c_uint32),
        ("grace_until_ns", ct.c_uint64),
        ("query_rate", ct.c_uint32),
        ("query_burst", ct.c_uint32),
        ("answer_rate", ct.c_uint32),
        ("answer_burst", ct.c_uint32),
        ("tcp_conns", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class CaptureKey(ct.Structure):
    """struct capture_key"""

    _fields_ = [("addr", IpAddr), ("family", ct.c_uint32)]


class PodKey(ct.Structure):
    """struct pod_key"""

    _fields_ = [("ifindex", ct.c_uint32), ("family", ct.c_uint32), ("addr", IpAddr)]


class Bucket(ct.Structure):
    """struct bucket"""

    _fields_ = [("ts", ct.c_uint64), ("tokens", ct.c_uint64)]


class PodInfo(ct.Structure):
    """struct pod_info"""

    _fields_ = [
        ("pod_id", ct.c_uint32),
        ("view", ct.c_uint32),
        ("tokens_ts", ct.c_uint64),
        ("tokens", ct.c_uint64),
        ("queries", Bucket),
        ("answers", Bucket),
    ]


class IfaceInfo(ct.Structure):
    """struct iface_info"""

    _fields_ = [("flags", ct.c_uint32), ("_pad", ct.c_uint32)]


class FlowKey(ct.Structure):
    """struct flow_key"""

    _fields_ = [
        ("pod", IpAddr),
        ("pod_port", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
    ]


class FlowVal(ct.Structure):
    """struct flow_val"""

    _fields_ = [
        ("orig", IpAddr),
        ("orig_port", ct.c_uint16),
        ("flags", ct.c_uint16),
        ("ifindex", ct.c_uint32),
        ("pod_id", ct.c_uint32),
        ("_pad2", ct.c_uint32),
        ("created_ns", ct.c_uint64),
    ]


class PodStats(ct.Structure):
    """struct pod_stats"""

    _fields_ = [
        ("queries", ct.c_uint64),
        ("redirected", ct.c_uint64),
        ("passed", ct.c_uint64),
        ("replies", ct.c_uint64),
        ("answered", ct.c_uint64),
        ("direct", ct.c_uint64),
        ("limited", ct.c_uint64),
    ]


FP_NAME_MAX = 128
FP_BODY_MAX = 256

# Keep in step with enum fp_result in bpf/lib/maps.h.
FASTPATH_RESULTS = ("hit", "miss", "fallthrough", "nxdomain", "cached")

FP_TTL_MAX = 16
FP_CK_EDNS = 1
FP_CK_CD = 4


class FpKey(ct.Structure):
    """struct fp_key"""

    _fields_ = [
        ("name", ct.c_uint8 * FP_NAME_MAX),
        ("qtype", ct.c_uint16),
        ("view", ct.c_uint16),
    ]


class FpAnswer(ct.Structure):
    """struct fp_answer"""

    _fields_ = [
        ("flag_hi", ct.c_uint8),
        ("flag_lo", ct.c_uint8),
        ("an", ct.c_uint16),
        ("ns", ct.c_uint16),
        ("ar", ct.c_uint16),
        ("len", ct.c_uint16),
        ("_pad", ct.c_uint16),
        ("body", ct.c_uint8 * FP_BODY_MAX),
    ]


class FpName(ct.Structure):
    """struct fp_name"""

    _fields_ = [("name", ct.c_uint8 * FP_NAME_MAX)]


class FpJunk(ct.Structure):
    """struct fp_junk"""

    _fields_ = [
        ("suffix_len", ct.c_uint32),
        ("pod_suffix_len", ct.c_uint32),
        ("suffix", ct.c_uint8 * FP_NAME_MAX),
        ("pod_suffix", ct.c_uint8 * FP_NAME_MAX),
        ("nxdomain", FpAnswer),
    ]


class FpCachedKey(ct.Structure):
    """struct fp_ckey"""

    _fields_ = [
        ("name", ct.c_uint8 * FP_NAME_MAX),
        ("qtype", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("family", ct.c_uint8),
        ("server", IpAddr),
    ]


class FpCached(ct.Structure):
    """struct fp_cached"""

    _fields_ = [
        ("stored_ns", ct.c_uint64),
        ("expires_ns", ct.c_uint64),
        ("due_ns", ct.c_uint64),
        ("ttl", ct.c_uint32 * FP_TTL_MAX),
        ("ttl_off", ct.c_uint16 * FP_TTL_MAX),
        ("nttl", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("ans", FpAnswer),
    ]


MIRRORS: dict[str, type[ct.Structure]] = {
    "ip_addr": IpAddr,
    "config": Config,
    "capture_key": CaptureKey,
    "pod_key": PodKey,
    "bucket": Bucket,
    "pod_info": PodInfo,
    "iface_info": IfaceInfo,
    "flow_key": FlowKey,
    "flow_val": FlowVal,
    "pod_stats": PodStats,
    "fp_key": FpKey,
    "fp_answer": FpAnswer,
    "fp_name": FpName,
    "fp_junk": FpJunk,
    "fp_ckey": FpCachedKey,
    "fp_cached": FpCached,
}


CType = type[ct.Structure] | type[ct.c_uint8] | type[ct.c_uint32] | type[ct.c_uint64]
"""A map's key or value type: a struct mirror or a plain integer."""


@dataclass(frozen=True)
class MapDef:
    """One pinned map as bpf/redirect.c declares it."""

    key: CType
    value: CType
    entries: int
    """Max entries; 0 when a flag sizes it (see :attr:`sized_by`)."""
    doc: str
    percpu: bool = False
    """One value per possible CPU (counters: no atomics on the hot path)."""
    fastpath: bool = False
    """Only when the programs are built with the in-kernel fast path."""
    sized_by: str = "fastpath_entries"
    """With ``entries`` 0: the build setting (a flag) that sizes the map."""


REGISTRY: dict[str, MapDef] = {
    "CONFIG": MapDef(ct.c_uint32, Config, 1, "agent settings and heartbeat, read by every packet"),
    "CAPTURE": MapDef(
        CaptureKey, ct.c_uint32, MAX_CAPTURE, "DNS server addresses whose traffic is captured"
    ),
    "PODS": MapDef(PodKey, PodInfo, MAX_PODS, "(veth, pod address) pairs allowed to create flows"),
    "IFACES": MapDef(ct.c_uint32, IfaceInfo, MAX_PODS, "host veths under management"),
    "FLOWS": MapDef(
        FlowKey,
        FlowVal,
        MAX_FLOWS,
        "pod sockets steered to the resolver, with the server they asked",
    ),
    "REASONS": MapDef(
        ct.c_uint32, ct.c_uint64, len(REASONS), "packets per path through the programs", True
    ),
    "POD_STATS": MapDef(
        ct.c_uint32, PodStats, MAX_PODS, "per-pod packet counters, indexed by pod id", True
    ),
    "TCP_CONNS": MapDef(
        ct.c_uint32, ct.c_uint32, MAX_PODS, "TCP connections each pod holds, by pod id"
    ),
    "FP_ANSWERS": MapDef(
        FpKey,
        FpAnswer,
        0,
        "answers the fast path gives in the kernel (a copy of the resolver's table)",
        fastpath=True,
    ),
    "FP_STATS": MapDef(
        ct.c_uint32,
        ct.c_uint64,
        len(FASTPATH_RESULTS),
        "in-kernel fast path outcomes",
        percpu=True,
        fastpath=True,
    ),
    "FP_OWNERS": MapDef(
        FpName,
        ct.c_uint8,
        0,
        "every name in the zone outside pod.<zone>: what is not here is junk (NXDOMAIN)",
        fastpath=True,
    ),
    "FP_JUNK": MapDef(
        ct.c_uint32,
        FpJunk,
        1,
        "where the kernel answers search-path junk (the zone), and its NXDOMAIN",
        fastpath=True,
    ),
    "FP_CACHE": MapDef(
        FpCachedKey,
        FpCached,
        0,
        "hot forwarded names from the resolver's cache, answered until their last tenth",
        fastpath=True,
        sized_by="fastpath_cached",
    ),
}
"""The one description of our pinned maps: the loader pins and carries them over by it,
open_maps opens them by it, and the inspection catalog decodes them by it."""


def family_of(ip: str) -> int:
    return FAMILY_V4 if ipaddress.ip_address(ip).version == 4 else FAMILY_V6


def flow_key(pod_ip: str, pod_port: int, proto: int) -> FlowKey:
    key = FlowKey()
    key.pod = IpAddr.of(pod_ip)
    key.pod_port = socket.htons(pod_port)
    key.proto = proto
    key.family = family_of(pod_ip)
    return key

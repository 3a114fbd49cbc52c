"""How to read each pinned map: its C types (the ctypes mirrors in datapath/maps.py) and how
to turn a key and a value into named fields for ``map dump``, ``stats`` and the metrics.

**Adding a map**: its :class:`~interceptor.datapath.maps.MapDef` in ``maps.REGISTRY``, then
one :func:`described` entry in :data:`CATALOG`.  A per-CPU array of counters indexed by an
enum is one line with :func:`counter_map`, plus one
:class:`CounterSet` in :data:`COUNTER_SETS` to show it in ``interceptor stats`` and export it
as a Prometheus counter.  A pinned map with no entry here is still listed and dumped, as hex.
"""

from __future__ import annotations

import ctypes as ct
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from interceptor.datapath import maps
from interceptor.dns import wire
from interceptor.dns.codes import rcode_text, type_text
from interceptor.ops.state import NodeState, PodEntry

Fields = dict[str, Any]


@dataclass
class Context:
    """What decoding needs beyond the bytes: names the kernel does not know, and the clock
    the programs stamp with (CLOCK_MONOTONIC, bpf_ktime_get_ns)."""

    state: NodeState | None = None
    now_ns: int = field(default_factory=time.monotonic_ns)
    ifnames: dict[int, str] = field(default_factory=dict)
    """ifindex -> name, from netlink (the state file covers only managed veths)."""

    def pod(self, pod_id: int) -> PodEntry | None:
        if self.state is None:
            return None
        return self.state.by_pod_id().get(pod_id)

    def pod_name(self, pod_id: int) -> str:
        p = self.pod(pod_id)
        return p.pod if p is not None else "?"

    def ifname(self, ifindex: int) -> str:
        if ifindex in self.ifnames:
            return self.ifnames[ifindex]
        if self.state is not None:
            for p in self.state.pods:
                if p.ifindex == ifindex:
                    return p.ifname
        return f"if{ifindex}"


CType = maps.CType
DecodeKey = Callable[[Any, Context], Fields]
DecodeValue = Callable[[Any, Any, Context], Fields]
"""(value, key, context) -> fields: some values only make sense with their key."""


@dataclass(frozen=True)
class MapSpec:
    key: CType
    value: CType
    decode_key: DecodeKey
    decode_value: DecodeValue
    columns: tuple[str, ...]
    """Fields shown by ``map dump`` in text, in order (all fields go to JSON)."""
    percpu: bool = False
    """Values are summed over CPUs (and kept per CPU in JSON)."""
    skip_zero: bool = False
    """Array slots whose summed value is all zero are not shown (unused pod ids)."""
    doc: str = ""


def _addr(a: maps.IpAddr, family: int) -> str:
    try:
        return a.text(family)
    except (OSError, ValueError):
        return "?"


def _age(ctx: Context, ts_ns: int) -> float | None:
    if not ts_ns:
        return None
    return round(max(0, ctx.now_ns - ts_ns) / 1e9, 3)


def _config(v: maps.Config, k: Any, ctx: Context) -> Fields:
    flags = [
        n
        for bit, n in (
            (maps.CFG_CAPTURE_ALL, "capture_all"),
            (maps.CFG_SK_LOOKUP, "sk_lookup"),
            (maps.CFG_CACHED_BY_SERVER, "cached_by_server"),
        )
        if v.flags & bit
    ]
    age = _age(ctx, v.heartbeat_ns)
    return {
        "heartbeat_age_s": age,
        "heartbeat_timeout_s": v.heartbeat_timeout / 1e9,
        "alive": age is not None and age * 1e9 <= v.heartbeat_timeout,
        "resolver4": _addr(v.resolver4, maps.FAMILY_V4) if any(v.resolver4.a) else None,
        "resolver6": _addr(v.resolver6, maps.FAMILY_V6) if any(v.resolver6.a) else None,
        "flags": flags,
        "flow_rate": v.flow_rate,
        "flow_burst": v.flow_burst,
    }


def _capture_key(k: maps.CaptureKey, ctx: Context) -> Fields:
    return {"address": _addr(k.addr, k.family), "family": f"ipv{k.family}"}


def _pod_key(k: maps.PodKey, ctx: Context) -> Fields:
    return {"ifindex": k.ifindex, "iface": ctx.ifname(k.ifindex), "ip": _addr(k.addr, k.family)}


def _pod_info(v: maps.PodInfo, k: Any, ctx: Context) -> Fields:
    return {
        "pod_id": v.pod_id,
        "pod": ctx.pod_name(v.pod_id),
        "flow_tokens": v.tokens // 1_000_000_000,
    }


def _ifindex(k: ct.c_uint32, ctx: Context) -> Fields:
    pods = []
    if ctx.state is not None:
        pods = sorted({p.pod for p in ctx.state.pods if p.ifindex == k.value})
    return {"ifindex": k.value, "iface": ctx.ifname(k.value), "pods": pods}


def _iface_info(v: maps.IfaceInfo, k: Any, ctx: Context) -> Fields:
    return {"flags": v.flags}


def _flow_key(k: maps.FlowKey, ctx: Context) -> Fields:
    proto = {socket.IPPROTO_UDP: "udp", socket.IPPROTO_TCP: "tcp"}.get(k.proto, str(k.proto))
    return {"pod_ip": _addr(k.pod, k.family), "pod_port": socket.ntohs(k.pod_port), "proto": proto}


def _flow_val(v: maps.FlowVal, k: maps.FlowKey, ctx: Context) -> Fields:
    return {
        "server": _addr(v.orig, k.family),
        "server_port": socket.ntohs(v.orig_port),
        "ifindex": v.ifindex,
        "iface": ctx.ifname(v.ifindex),
        "pod_id": v.pod_id,
        "pod": ctx.pod_name(v.pod_id),
        "age_s": _age(ctx, v.created_ns),
    }


def _slot(k: ct.c_uint32, ctx: Context) -> Fields:
    return {"pod_id": k.value, "pod": ctx.pod_name(k.value)}


def _struct_fields(v: Any, k: Any, ctx: Context) -> Fields:
    """Every public field of a flat struct of integers (counters), by name."""
    return {n: getattr(v, n) for n, *_ in v._fields_ if not n.startswith("_")}


def _u32(v: ct.c_uint32, k: Any, ctx: Context) -> Fields:
    return {"value": v.value}


def _fp_key(k: maps.FpKey, ctx: Context) -> Fields:
    return {"name": _wire_name(bytes(k.name)), "qtype": type_text(socket.ntohs(k.qtype))}


def _wire_name(raw: bytes) -> str:
    try:
        name, _ = wire.decode_name_plain(raw, 0)
    except (ValueError, IndexError):
        return raw.rstrip(b"\0").hex()
    return name or "."


def _fp_name(k: maps.FpName, ctx: Context) -> Fields:
    return {"name": _wire_name(bytes(k.name))}


def _fp_junk(v: maps.FpJunk, k: Any, ctx: Context) -> Fields:
    return {
        "suffix": _wire_name(bytes(v.suffix)) if v.suffix_len else "",
        "on": bool(v.suffix_len),
        **_fp_answer(v.nxdomain, k, ctx),
    }


def _fp_cached_key(k: maps.FpCachedKey, ctx: Context) -> Fields:
    flags = [n for bit, n in ((maps.FP_CK_EDNS, "edns"), (maps.FP_CK_CD, "cd")) if k.flags & bit]
    return {
        "name": _wire_name(bytes(k.name)),
        "qtype": type_text(socket.ntohs(k.qtype)),
        "query": flags,
        "server": _addr(k.server, k.family) if k.family else "any",
    }


def _fp_cached(v: maps.FpCached, k: Any, ctx: Context) -> Fields:
    return {
        **_fp_answer(v.ans, k, ctx),
        "kernel_for_s": round(max(0, v.due_ns - ctx.now_ns) / 1e9, 1),
        "ttls": list(v.ttl[: v.nttl]),
    }


def _fp_answer(v: maps.FpAnswer, k: Any, ctx: Context) -> Fields:
    rcode = v.flag_lo & 0xF
    return {
        "rcode": rcode_text(rcode),
        "answers": socket.ntohs(v.an),
        "authority": socket.ntohs(v.ns),
        "additional": socket.ntohs(v.ar),
        "body_bytes": v.len,
    }


def described(
    name: str,
    decode_key: DecodeKey,
    decode_value: DecodeValue,
    columns: tuple[str, ...],
    skip_zero: bool = False,
) -> MapSpec:
    """A map's decoders, with its types, per-CPU flag and description from the registry."""
    d = maps.REGISTRY[name]
    return MapSpec(d.key, d.value, decode_key, decode_value, columns, d.percpu, skip_zero, d.doc)


def counter_map(name: str, labels: Sequence[str], label: str) -> MapSpec:
    """A per-CPU array of u64 counters indexed by an enum whose names are ``labels``."""

    def key(k: ct.c_uint32, ctx: Context) -> Fields:
        i = k.value
        return {"index": i, label: labels[i] if i < len(labels) else f"#{i}"}

    def value(v: ct.c_uint64, k: Any, ctx: Context) -> Fields:
        return {"count": v.value}

    return described(name, key, value, (label, "count"))


CATALOG: dict[str, MapSpec] = {
    "CONFIG": described(
        "CONFIG",
        lambda k, ctx: {"index": k.value},
        _config,
        ("heartbeat_age_s", "alive", "resolver4", "resolver6", "flags", "flow_rate"),
    ),
    "CAPTURE": described("CAPTURE", _capture_key, _u32, ("address", "family")),
    "PODS": described("PODS", _pod_key, _pod_info, ("iface", "ip", "pod_id", "pod", "flow_tokens")),
    "IFACES": described("IFACES", _ifindex, _iface_info, ("ifindex", "iface", "pods")),
    "FLOWS": described(
        "FLOWS",
        _flow_key,
        _flow_val,
        ("pod_ip", "pod_port", "proto", "server", "pod", "age_s"),
    ),
    "REASONS": counter_map("REASONS", maps.REASONS, "reason"),
    "POD_STATS": described(
        "POD_STATS",
        _slot,
        _struct_fields,
        ("pod_id", "pod", *(n for n, *_ in maps.PodStats._fields_)),
        skip_zero=True,
    ),
    "TCP_CONNS": described(
        "TCP_CONNS",
        _slot,
        lambda v, k, ctx: {"connections": v.value},
        ("pod_id", "pod", "connections"),
        skip_zero=True,
    ),  # fmt: skip
    "FP_STATS": counter_map("FP_STATS", maps.FASTPATH_RESULTS, "result"),
    "FP_ANSWERS": described(
        "FP_ANSWERS", _fp_key, _fp_answer, ("name", "qtype", "rcode", "answers", "body_bytes")
    ),
    "FP_OWNERS": described("FP_OWNERS", _fp_name, lambda v, k, ctx: {}, ("name",)),
    "FP_CACHE": described(
        "FP_CACHE",
        _fp_cached_key,
        _fp_cached,
        ("name", "qtype", "query", "server", "rcode", "answers", "kernel_for_s"),
    ),
    "FP_JUNK": described(
        "FP_JUNK",
        lambda k, ctx: {"index": k.value},
        _fp_junk,
        ("suffix", "on", "rcode", "authority", "body_bytes"),
    ),
}


# What each reason means for the packet: "rewritten", "passed" (to the server the pod asked,
# untouched), "fail-open" (passed because the resolver is not there) or "dropped".
VERDICTS: dict[str, str] = {
    "redirected": "rewritten",
    "reply_restored": "rewritten",
    "spoofed": "passed",
    "unknown_pod": "passed",
    "stale_heartbeat": "fail-open",
    "no_socket": "fail-open",
    "rate_limited": "passed",
    "no_flow": "passed",
    "not_captured": "passed",
    "csum_error": "dropped",
    "malformed": "passed",
    "direct": "passed",
    "query_limited": "dropped",
    "answer_limited": "dropped",
    "tcp_limited": "dropped",
}


@dataclass(frozen=True)
class CounterSet:
    """A per-CPU counter array shown by ``interceptor stats`` and exported as
    ``<metric>{<label>=...}``."""

    map_name: str
    labels: tuple[str, ...]
    label: str
    metric: str
    """Prometheus name without the ``_total`` suffix (prometheus-client adds it)."""
    doc: str
    verdicts: dict[str, str] = field(default_factory=dict)


COUNTER_SETS: list[CounterSet] = [
    CounterSet(
        "REASONS",
        maps.REASONS,
        "reason",
        "interceptor_bpf_events",
        "Packets seen by the tc programs, by the path they took (summed over CPUs)",
        VERDICTS,
    ),
    CounterSet(
        "FP_STATS",
        maps.FASTPATH_RESULTS,
        "result",
        "interceptor_fastpath",
        "Captured queries by in-kernel fast path outcome: hit (answered in the kernel), miss "
        "(not a known name), fallthrough (known, but left to the resolver), nxdomain (of the "
        "hits: search-path junk answered NXDOMAIN), cached (of the hits: a hot forwarded "
        "name from the cache)",
        {
            "hit": "answered",
            "miss": "to resolver",
            "fallthrough": "to resolver",
            "nxdomain": "answered (junk)",
            "cached": "answered (cached)",
        },
    ),
]


def decode(spec: MapSpec | None, key: bytes, values: list[bytes], ctx: Context) -> Fields | None:
    """One entry as {"key": {...}, "value": {...}[, "per_cpu": [...]]}; None for a zero slot
    that the spec hides.  Unknown maps (spec None) come out as hex, like bpftool."""
    if spec is None:
        out: Fields = {"key": {"hex": key.hex(" ")}}
        if len(values) == 1:
            out["value"] = {"hex": values[0].hex(" ")}
        else:
            out["per_cpu"] = [{"cpu": i, "hex": v.hex(" ")} for i, v in enumerate(values)]
        return out
    k = spec.key.from_buffer_copy(key)
    parsed = [spec.value.from_buffer_copy(v) for v in values]
    total = sum_values(parsed) if spec.percpu else parsed[0]
    if spec.skip_zero and not any(bytes(total)):
        return None
    out = {"key": spec.decode_key(k, ctx), "value": spec.decode_value(total, k, ctx)}
    if spec.percpu:
        out["per_cpu"] = [
            {"cpu": i, **spec.decode_value(v, k, ctx)}
            for i, v in enumerate(parsed)
            if any(bytes(v))
        ]
    return out


def sum_values(values: Sequence[Any]) -> Any:
    """Field-wise sum of per-CPU values (counters: each CPU counts its own packets)."""
    first = values[0]
    if isinstance(first, ct.Structure):
        out = type(first)()
        for name, *_ in first._fields_:
            setattr(out, name, sum(getattr(v, name) for v in values))
        return out
    return type(first)(sum(v.value for v in values))

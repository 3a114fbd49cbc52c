"""The data behind ``prog show``, ``map show``, ``map dump``, ``net show`` and ``stats``:
plain dicts and lists, ready for JSON, read from the kernel and the pins only (so they work
while the agent is down).

"Ours" is decided by the kernel's own bookkeeping, not by names: a program is ours when it
uses a map pinned under ``--pin-path``, and a tc filter is ours when it runs one of those
programs.  Two agents (or two labs) with different pin paths never claim each other's
objects.
"""

from __future__ import annotations

import ctypes as ct
import datetime as dt
from dataclasses import asdict
from pathlib import Path
from typing import Any

from interceptor.datapath.hooks import LinkHooks, link_hooks, link_names
from interceptor.datapath.introspect import (
    IntrospectError,
    MapMeta,
    NeedRoot,
    Program,
    RawMap,
    program,
    programs,
    stats_enabled,
)
from interceptor.ops.catalog import CATALOG, COUNTER_SETS, Context, decode
from interceptor.ops.counters import COUNTS, CounterReader
from interceptor.ops.state import NodeState, agent_alive

View = dict[str, Any]


class NoPins(IntrospectError):
    """no pinned maps found."""


def pinned_maps(pin_dir: Path) -> dict[str, MapMeta]:
    """name -> metadata of every map pinned under ``pin_dir``."""
    if not pin_dir.is_dir():
        raise NoPins(f"{pin_dir} does not exist (is --pin-path right? the agent creates it)")
    out = {}
    for path in sorted(pin_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue  # bpf(2) calls a directory EACCES, which would read as "not root"
        try:
            with RawMap.pinned(path) as m:
                out[path.name] = m.meta
        except NeedRoot:
            raise
        except IntrospectError:
            continue  # a pinned program or link, not a map
    if not out:
        raise NoPins(f"{pin_dir} holds no maps")
    return out


def our_programs(pin_dir: Path) -> tuple[dict[str, MapMeta], list[Program]]:
    pins = pinned_maps(pin_dir)
    ids = {m.id for m in pins.values()}
    return pins, [p for p in programs() if ids & set(p.map_ids)]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _attachments(progs: list[Program], links: list[LinkHooks]) -> dict[int, list[str]]:
    ids = {p.id for p in progs}
    out: dict[int, list[str]] = {}
    for link in links:
        for h in link.hooks:
            if h.prog_id in ids:
                out.setdefault(h.prog_id, []).append(f"{h.ifname}/{h.direction}")
    return out


def prog_show(pin_dir: Path) -> View:
    pins, progs = our_programs(pin_dir)
    names = {m.id: name for name, m in pins.items()}
    for i in {i for p in progs for i in p.map_ids} - set(names):
        names[i] = _map_name(i)  # not pinned: bcc's own (e.g. .rodata), named by the kernel
    attached = _attachments(progs, link_hooks())
    rows = []
    for p in sorted(progs, key=lambda p: p.id):
        rows.append(
            {
                "id": p.id,
                "type": p.type,
                "name": p.name,
                "tag": p.tag,
                "loaded_at": _iso(p.loaded_at),
                "uid": p.uid,
                "run_cnt": p.run_cnt,
                "run_time_ns": p.run_time_ns,
                "avg_ns": round(p.run_time_ns / p.run_cnt) if p.run_cnt else None,
                "xlated_bytes": p.xlated_len,
                "jited_bytes": p.jited_len,
                "verified_insns": p.verified_insns,
                "maps": [{"id": i, "name": names.get(i, "")} for i in p.map_ids],
                "attached": sorted(attached.get(p.id, [])),
            }
        )
    return {"pin_path": str(pin_dir), "stats_enabled": stats_enabled(), "programs": rows}


def map_show(pin_dir: Path) -> View:
    pins, progs = our_programs(pin_dir)
    users: dict[int, list[int]] = {}
    for p in progs:
        for i in p.map_ids:
            users.setdefault(i, []).append(p.id)
    rows = []
    for name, meta in sorted(pins.items()):
        with RawMap.pinned(pin_dir / name) as m:
            entries = m.count()
        rows.append(
            {
                "name": name,
                "id": meta.id,
                "type": meta.type,
                "key_size": meta.key_size,
                "value_size": meta.value_size,
                "max_entries": meta.max_entries,
                "entries": entries,
                "flags": meta.flags,
                "pinned": str(pin_dir / name),
                "decoded": name in CATALOG,
                "doc": CATALOG[name].doc if name in CATALOG else "",
                "prog_ids": sorted(users.get(meta.id, [])),
            }
        )
    return {"pin_path": str(pin_dir), "maps": rows}


class UnknownMap(IntrospectError):
    """no such map."""


def map_dump(pin_dir: Path, name: str, state: NodeState | None) -> View:
    pins = pinned_maps(pin_dir)
    match = {n.upper(): n for n in pins}.get(name.upper())
    if match is None:
        raise UnknownMap(f"{name!r} is not pinned in {pin_dir}; maps: {', '.join(sorted(pins))}")
    spec = CATALOG.get(match)
    ctx = Context(state, ifnames=_ifnames())
    rows = []
    with RawMap.pinned(pin_dir / match) as m:
        meta = m.meta
        if spec is not None and (
            meta.key_size != _size(spec.key) or meta.value_size != _size(spec.value)
        ):
            spec = None  # another version's layout: show bytes rather than nonsense
        for key, values in m.items():
            row = decode(spec, key, values, ctx)
            if row is not None:
                rows.append(row)
    return {
        "name": match,
        "id": meta.id,
        "type": meta.type,
        "decoded": spec is not None,
        "columns": list(spec.columns) if spec is not None else ["hex"],
        "entries": rows,
    }


def _size(t: Any) -> int:
    return ct.sizeof(t)


def _ifnames() -> dict[int, str]:
    try:
        return link_names()
    except OSError:  # netlink unavailable: names from the state file will do
        return {}


def net_show(pin_dir: Path, state: NodeState | None, dev: str | None = None) -> View:
    """Links with our programs or anyone's programs on their tc hooks, with their pods."""
    links = link_hooks(dev)
    if dev is not None and not links:
        raise IntrospectError(f"no interface named {dev!r} in this network namespace")
    try:
        pins, progs = our_programs(pin_dir)
    except NoPins:
        pins, progs = {}, []
    ours = {p.id: p for p in progs}
    managed: set[int] = set()
    if "IFACES" in pins:
        with RawMap.pinned(pin_dir / "IFACES") as m:
            managed = {int.from_bytes(k, "little") for k in m.keys()}
    pods_by_if = state.by_ifindex() if state is not None else {}
    names: dict[int, str] = {}
    rows = []
    for link in sorted(links, key=lambda ln: ln.ifname):
        if not link.hooks and link.ifindex not in managed:
            continue
        pods = sorted({p.pod for p in pods_by_if.get(link.ifindex, [])})
        hooks = []
        for h in sorted(
            link.hooks, key=lambda h: (h.direction, h.attach, h.prio or 0, h.handle or 0)
        ):
            prog = ours.get(h.prog_id) if h.prog_id is not None else None
            name = h.name
            if h.prog_id is not None and not name:
                name = names.get(h.prog_id) or _prog_name(h.prog_id)
                names[h.prog_id] = name
            hooks.append(
                {
                    **{k: v for k, v in asdict(h).items() if k not in ("ifindex", "ifname")},
                    "name": prog.name if prog is not None else name,
                    "ours": prog is not None,
                }
            )
        missing = link.ifindex in managed and not any(h["ours"] for h in hooks)
        rows.append(
            {
                "ifindex": link.ifindex,
                "ifname": link.ifname,
                "kind": link.kind,
                "managed": link.ifindex in managed,
                "programs_missing": missing,
                "pods": pods,
                "hooks": hooks,
                "tcx_supported": link.tcx_supported,
            }
        )
    return {"pin_path": str(pin_dir), "interfaces": rows}


def _map_name(map_id: int) -> str:
    try:
        m = RawMap.by_id(map_id)
    except IntrospectError:
        return ""
    if m is None:
        return ""
    with m:
        return m.meta.name


def _prog_name(prog_id: int) -> str:
    try:
        p = program(prog_id)
    except IntrospectError:
        return ""
    return p.name if p is not None else ""


def stats(pin_dir: Path, state: NodeState | None) -> View:
    with CounterReader(pin_dir, lambda: state) as reader:
        snap = reader.read()
    sets = []
    for cs in COUNTER_SETS:
        counts = snap.counters.get(cs.map_name)
        if counts is None:
            continue
        sets.append(
            {
                "map": cs.map_name,
                "label": cs.label,
                "counts": [
                    {cs.label: k, "count": v, "verdict": cs.verdicts.get(k, "")}
                    for k, v in counts.items()
                ],
            }
        )
    return {
        "pin_path": str(pin_dir),
        "agent_running": agent_alive(state),
        "interfaces": snap.interfaces,
        "pod_counters": list(COUNTS),
        "pods": [
            {
                "namespace": p.namespace,
                "name": p.name,
                "pod": p.pod,
                "ips": list(p.ips),
                "ifnames": list(p.ifnames),
                "pod_ids": list(p.pod_ids),
                **p.counts,
            }
            for p in snap.pods
        ],
        "counters": sets,
    }

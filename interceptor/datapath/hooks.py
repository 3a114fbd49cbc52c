"""Every program on the tc hooks of this network namespace's links: cls_bpf filters on the
clsact qdisc (with the kernel's program id), and tcx programs (kernel >= 6.6).

Read-only, for ``interceptor net show``; the agent's attach path lives in tc.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from interceptor.datapath.tc import PARENTS
from interceptor.datapath.tcx import tcx_programs

# cls_bpf attributes (TCA_BPF_* in uapi/linux/pkt_cls.h) that pyroute2 does not decode.
TCA_BPF_TAG = 10
TCA_BPF_ID = 11


@dataclass(frozen=True)
class Hook:
    """One program (or non-BPF filter) on a link's ingress or egress hook."""

    ifindex: int
    ifname: str
    direction: str
    """``ingress`` (packets the pod sends, on a host veth) or ``egress``."""
    attach: str
    """``tc`` (a clsact filter) or ``tcx``."""
    kind: str
    """tc classifier kind (``bpf``, ``u32``, ``flower`` ...); ``bpf`` for tcx."""
    prio: int | None
    handle: int | None
    name: str
    prog_id: int | None


@dataclass(frozen=True)
class LinkHooks:
    ifindex: int
    ifname: str
    kind: str
    hooks: tuple[Hook, ...]
    tcx_supported: bool


def _unknown_attrs(opts: Any) -> dict[int, bytes]:
    """Raw payloads of the attributes pyroute2 left undecoded, by attribute type."""
    out: dict[int, bytes] = {}
    for _, value in opts.get("attrs", ()):
        header = getattr(value, "get", lambda _k: None)("header")
        if not isinstance(header, dict) or not hasattr(value, "data"):
            continue
        start = value.offset + 4
        out[header["type"]] = bytes(value.data[start : value.offset + header["length"]])
    return out


def _filters(ipr: IPRoute, ifindex: int, ifname: str) -> list[Hook]:
    out: list[Hook] = []
    for direction, parent in PARENTS.items():
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except NetlinkError:
            continue  # no clsact on this link
        for msg in msgs:
            if not msg["handle"]:
                continue  # the per-prio chain header, not a filter
            kind = msg.get_attr("TCA_KIND") or ""
            opts = msg.get_attr("TCA_OPTIONS")
            name, prog_id = "", None
            if kind == "bpf" and opts is not None and hasattr(opts, "get_attr"):
                name = opts.get_attr("TCA_BPF_NAME") or ""
                raw = _unknown_attrs(opts).get(TCA_BPF_ID)
                if raw is not None and len(raw) >= 4:
                    prog_id = int.from_bytes(raw[:4], "little")
            out.append(
                Hook(
                    ifindex,
                    ifname,
                    direction,
                    "tc",
                    kind,
                    (msg["info"] >> 16) & 0xFFFF,
                    msg["handle"],
                    name,
                    prog_id,
                )
            )
    return out


def link_hooks(ifname: str | None = None) -> list[LinkHooks]:
    """Links of the current network namespace (or just ``ifname``) with their programs.
    Links with nothing attached are included; callers filter."""
    out: list[LinkHooks] = []
    with IPRoute() as ipr:
        if ifname is None:
            links = ipr.get_links()
        else:
            found = ipr.link_lookup(ifname=ifname)
            links = ipr.get_links(*found) if found else []
        for msg in links:
            ifindex = msg["index"]
            name = msg.get_attr("IFLA_IFNAME") or str(ifindex)
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else "") or ""
            hooks = _filters(ipr, ifindex, name)
            tcx = tcx_programs(ifindex)
            for direction, ids in (tcx or {}).items():
                for prog_id in ids:
                    hooks.append(
                        Hook(ifindex, name, direction, "tcx", "bpf", None, None, "", prog_id)
                    )
            out.append(LinkHooks(ifindex, name, kind, tuple(hooks), tcx is not None))
    return out


def link_names() -> dict[int, str]:
    """ifindex -> name of every link in this network namespace."""
    with IPRoute() as ipr:
        return {m["index"]: m.get_attr("IFLA_IFNAME") or "" for m in ipr.get_links()}

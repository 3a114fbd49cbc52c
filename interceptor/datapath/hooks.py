"""Every program on the tc hooks of this network namespace's links: cls_bpf filters on the
clsact qdisc (with the kernel's program id), and tcx programs (kernel >= 6.6).

Read-only, for ``interceptor net show``; the agent's attach path lives in tc.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from interceptor.datapath.netlink import IPRoute
from interceptor.datapath.tc import list_filters
from interceptor.datapath.tcx import tcx_programs


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


def _filters(ipr: IPRoute, ifindex: int, ifname: str) -> list[Hook]:
    return [
        Hook(ifindex, ifname, f.direction, "tc", f.kind, f.prio, f.handle, f.name, f.prog_id)
        for f in list_filters(ipr, ifindex)
    ]


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

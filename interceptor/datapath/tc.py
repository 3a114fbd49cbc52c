"""tc clsact plumbing with pyroute2: our filters only, identified by (prio, handle).

Rules for living next to a CNI: the clsact qdisc belongs to everyone, so it is added when
missing and never deleted; our filters are replaced atomically (``replace-filter``) so a
restarted agent swaps programs with no gap; only filters with our prio *and* handle are ever
removed.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from interceptor.datapath.netlink import IPRoute, NetlinkError
from interceptor.errors import InterceptorError

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


class AttachError(InterceptorError):
    """cannot attach the BPF programs."""


@dataclass(frozen=True)
class Filter:
    """One tc filter on a clsact hook, ours or not."""

    ifindex: int
    direction: str
    prio: int
    handle: int
    kind: str
    name: str
    prog_id: int | None = None
    """The kernel's id of a cls_bpf filter's program (None for other kinds)."""


# cls_bpf attributes (TCA_BPF_* in uapi/linux/pkt_cls.h) that pyroute2 does not decode.
TCA_BPF_ID = 11


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


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise AttachError(f"clsact on ifindex {ifindex}: {exc}") from exc


def replace_filter(
    ipr: IPRoute, ifindex: int, direction: str, fd: int, name: str, prio: int, handle: int
) -> None:
    parent = INGRESS if direction == "ingress" else EGRESS
    try:
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            handle,
            fd=fd,
            name=name,
            parent=parent,
            classid=1,
            direct_action=True,
            prio=prio,
        )
    except NetlinkError as exc:
        raise AttachError(f"{direction} filter on ifindex {ifindex}: {exc}") from exc


def delete_filter(ipr: IPRoute, ifindex: int, direction: str, prio: int, handle: int) -> bool:
    """Remove our filter; a link or filter already gone is not an error."""
    parent = INGRESS if direction == "ingress" else EGRESS
    try:
        ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise AttachError(f"removing {direction} filter on ifindex {ifindex}: {exc}") from exc


def list_filters(ipr: IPRoute, ifindex: int) -> list[Filter]:
    """Every filter on the clsact hooks of a link (empty if it has no clsact): the one reader
    of the kernel's filter dump, for the agent's attach path and for ``net show``."""
    out: list[Filter] = []
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
            if opts is not None and hasattr(opts, "get_attr"):
                name = opts.get_attr("TCA_BPF_NAME") or ""
                raw = _unknown_attrs(opts).get(TCA_BPF_ID) if kind == "bpf" else None
                if raw is not None and len(raw) >= 4:
                    prog_id = int.from_bytes(raw[:4], "little")
            prio = (msg["info"] >> 16) & 0xFFFF
            out.append(Filter(ifindex, direction, prio, msg["handle"], kind, name, prog_id))
    return out

"""tc clsact plumbing with pyroute2: our filters only, identified by (prio, handle).

Rules for living next to a CNI: the clsact qdisc belongs to everyone, so it is added when
missing and never deleted; our filters are replaced atomically (``replace-filter``) so a
restarted agent swaps programs with no gap; only filters with our prio *and* handle are ever
removed.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
    """Every filter on the clsact hooks of a link (empty if it has no clsact)."""
    out: list[Filter] = []
    for direction, parent in PARENTS.items():
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except NetlinkError:
            continue
        for msg in msgs:
            if not msg["handle"]:
                continue  # the per-prio chain header, not a filter
            opts = msg.get_attr("TCA_OPTIONS")
            name = ""
            if opts is not None and hasattr(opts, "get_attr"):
                name = opts.get_attr("TCA_BPF_NAME") or ""
            out.append(
                Filter(
                    ifindex,
                    direction,
                    (msg["info"] >> 16) & 0xFFFF,
                    msg["handle"],
                    msg.get_attr("TCA_KIND") or "",
                    name,
                )
            )
    return out

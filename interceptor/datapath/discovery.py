"""Which host-side veth belongs to which pod address, from the kernel's own tables.

* Point-to-point CNIs (kindnet, Calico): the route to the pod IP leaves through its veth.
* Bridge CNIs (flannel's cni0): the route leaves through the bridge; the pod's MAC comes from
  the neighbour table and the bridge's FDB says which port (veth) has that MAC.  A pod with no
  neighbour entry yet is nudged (see ``_nudge``) and picked up on the neighbour event.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from interceptor.datapath.netlink import IPRoute, NetlinkError

log = logging.getLogger(__name__)

AF_BRIDGE = 7
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERM


@dataclass(frozen=True)
class Link:
    ifindex: int
    name: str
    kind: str


class LinkFinder:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    @classmethod
    def open(cls) -> LinkFinder:
        return cls(IPRoute())

    def __enter__(self) -> LinkFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()

    def link(self, ifindex: int) -> Link | None:
        try:
            msg = self.ipr.get_links(ifindex)[0]
        except (NetlinkError, IndexError):
            return None
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
        return Link(ifindex, msg.get_attr("IFLA_IFNAME"), kind or "")

    def links(self) -> list[Link]:
        out = []
        for msg in self.ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
            out.append(Link(msg["index"], msg.get_attr("IFLA_IFNAME"), kind or ""))
        return out

    def host_veth(self, ip: str) -> Link | None:
        """The veth on this node that leads to ``ip``, or None."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            routes = self.ipr.route("get", dst=ip, family=family)
        except NetlinkError:
            return None
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        if oif is None:
            return None
        out = self.link(oif)
        if out is None:
            return None
        if out.kind == "veth":
            return out
        if out.kind == "bridge":
            return self._bridge_port(out, ip, family)
        return None

    def _bridge_port(self, bridge: Link, ip: str, family: int) -> Link | None:
        mac = None
        for n in self.ipr.get_neighbours(family=family, ifindex=bridge.ifindex):
            if n.get_attr("NDA_DST") == ip and n["state"] & NUD_USABLE:
                mac = n.get_attr("NDA_LLADDR")
                break
        if mac is None:
            _nudge(ip, family)
            return None
        for entry in self.ipr.get_neighbours(family=AF_BRIDGE):
            if (
                entry.get_attr("NDA_LLADDR") == mac
                and entry.get_attr("NDA_MASTER") == bridge.ifindex
            ):
                port = self.link(entry["ifindex"])
                if port is not None and port.kind == "veth":
                    return port
        return None

    def routed_veths(self) -> list[tuple[Link, str]]:
        """(veth, address) for every host route to a single address that leaves through a
        veth: what a point-to-point CNI (ptp, kindnet, Calico) sets up for a pod before its
        containers start, so the kernel knows a new pod before the API server does."""
        out = []
        kinds: dict[int, Link | None] = {}
        for family, bits in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            try:
                routes = self.ipr.get_routes(family=family, table=254)
            except NetlinkError:
                continue
            for r in routes:
                if r["dst_len"] != bits or r["type"] != 1:  # RTN_UNICAST
                    continue
                oif, dst = r.get_attr("RTA_OIF"), r.get_attr("RTA_DST")
                if oif is None or dst is None:
                    continue
                if oif not in kinds:
                    kinds[oif] = self.link(oif)
                link = kinds[oif]
                if link is not None and link.kind == "veth":
                    out.append((link, str(dst)))
        return out

    def matching(self, pattern: str) -> list[Link]:
        return [ln for ln in self.links() if fnmatch.fnmatch(ln.name, pattern)]


def _nudge(ip: str, family: int) -> None:
    """Make the kernel resolve a pod's MAC: one empty datagram to its discard port (9) makes
    the node ARP for it, and the neighbour event that follows triggers a new pass."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"", (ip, 9))
    except OSError:
        pass


RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
WAKING_EVENTS = frozenset((16, 17, 24, 25))
"""RTM_NEWLINK, RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE."""
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
NDA_DST = 1
NDMSG = struct.Struct("=BBHiHBB")
RTATTR = struct.Struct("=HH")
MAX_NEIGHBOURS = 1 << 16
NLMSG_HEADER = struct.Struct("=IHHII")


class NetlinkEvents:
    """Calls ``on_event`` (from a thread) whenever links, routes or neighbours change, so the
    agent re-reads the tables right away instead of waiting for its timer.

    A plain netlink socket and a pipe, not pyroute2: only the message types matter here, and
    closing a pyroute2 socket from another thread while it waits in ``get()`` can block on its
    lock, which once held the agent's stop past kubelet's grace period."""

    def __init__(self, on_event: Callable[[], None]) -> None:
        self.on_event = on_event
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        self._filter = WakeFilter()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="netlink-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                try:
                    data = self._sock.recv(1 << 16)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        log.warning("netlink event socket: %s", exc)
                        return
                    self.on_event()  # events were lost: re-read everything
                    continue
                if self._filter.wakes(data):
                    self.on_event()
        finally:
            self._sock.close()

    def close(self) -> None:
        """Stop the thread (it closes its socket); never blocks for long."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=1)
        else:
            self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class WakeFilter:
    """Which netlink messages are news to the link tables: link and route changes, and a
    neighbour the agent has not seen before.  A known neighbour's state changes (reachable,
    stale, delay, probe) come every few seconds for every busy pod; a pass over the tables
    for each would take the interpreter from the resolver for nothing."""

    def __init__(self) -> None:
        self._neighbours: set[tuple[int, bytes]] = set()

    def wakes(self, data: bytes) -> bool:
        """Whether a batch of netlink messages holds a change the link tables care about
        (every message is read: a batch may also carry neighbours to remember)."""
        woke = False
        off = 0
        while off + NLMSG_HEADER.size <= len(data):
            length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, off)
            if length < NLMSG_HEADER.size or off + length > len(data):
                break
            if kind in WAKING_EVENTS:
                woke = True
            elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
                key = _neighbour(data[off + NLMSG_HEADER.size : off + length])
                if key is None:
                    woke = woke or kind == RTM_NEWNEIGH
                elif kind == RTM_DELNEIGH:
                    self._neighbours.discard(key)
                elif key not in self._neighbours:
                    if len(self._neighbours) >= MAX_NEIGHBOURS:
                        self._neighbours.clear()
                    self._neighbours.add(key)
                    woke = True
            off += (length + 3) & ~3
        return woke


def _neighbour(body: bytes) -> tuple[int, bytes] | None:
    """(ifindex, destination address) of an ndmsg, or None if it has none."""
    if len(body) < NDMSG.size:
        return None
    ifindex = NDMSG.unpack_from(body)[3]
    off = NDMSG.size
    while off + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, off)
        if length < RTATTR.size:
            return None
        if kind == NDA_DST:
            return ifindex, bytes(body[off + RTATTR.size : off + length])
        off += (length + 3) & ~3
    return None

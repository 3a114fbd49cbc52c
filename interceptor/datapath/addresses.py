"""The resolver's node-local address (169.254.20.10 by default, as NodeLocal DNSCache) on a
device of the node: ``lo`` by default, since not every kernel has ``dummy`` links."""

from __future__ import annotations

import errno
import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from interceptor.errors import InterceptorError

IFA_F_NODAD = 0x02


class AddressError(InterceptorError):
    """cannot manage the resolver address."""


def add_address(device: str, ip: str) -> bool:
    """Add ``ip`` as a host address (/32, /128) on ``device``.  True if we added it, False
    if it was already there (then it is not ours to remove)."""
    prefix = 32 if ipaddress.ip_address(ip).version == 4 else 128
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=device)
        if not idx:
            raise AddressError(f"no device {device!r}")
        try:
            # NODAD: a host address on lo needs no duplicate detection, and a tentative
            # IPv6 address cannot be bound (EADDRNOTAVAIL) until DAD ends.
            ipr.addr("add", index=idx[0], address=ip, prefixlen=prefix, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise AddressError(f"{ip} on {device}: {exc}") from exc
    return True


def remove_address(device: str, ip: str) -> None:
    prefix = 32 if ipaddress.ip_address(ip).version == 4 else 128
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=device)
        if not idx:
            return
        try:
            ipr.addr("del", index=idx[0], address=ip, prefixlen=prefix)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise AddressError(f"removing {ip} from {device}: {exc}") from exc

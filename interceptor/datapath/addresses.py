"""The resolver's node-local address (169.254.20.10 by default, as NodeLocal DNSCache) on a
device of the node: ``lo`` by default, since not every kernel has ``dummy`` links."""

from __future__ import annotations

import errno
import ipaddress
import os
from pathlib import Path

from interceptor.datapath.netlink import IPRoute, NetlinkError
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


class AddressBook:
    """The resolver addresses this agent put on the node, remembered in its state directory.

    An address already on the device when the agent starts is someone else's, and is left
    alone, unless the book says an earlier agent of ours added it: one that was killed
    (OOM, SIGKILL after the grace period) could not take it away, and without the book no
    agent would ever remove it, not even when the DaemonSet is deleted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> set[str]:
        try:
            return {ln.strip() for ln in self.path.read_text().splitlines() if ln.strip()}
        except OSError:
            return set()

    def _write(self, ips: set[str]) -> None:
        if not ips:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{ip}\n" for ip in sorted(ips)))
        os.replace(tmp, self.path)

    def claim(self, device: str, ip: str) -> bool:
        """Put ``ip`` on ``device``; True if it is ours to remove (added now, or by an
        earlier agent of ours that could not remove it)."""
        known = self._read()
        if add_address(device, ip) or ip in known:
            self._write(known | {ip})
            return True
        return False

    def release(self, device: str, ip: str) -> None:
        remove_address(device, ip)
        self._write(self._read() - {ip})

"""Whether the service map holds its source's full picture yet."""

from __future__ import annotations


class SyncGate:
    """Closed until the source's first full sync (a file opens it at once; the Kubernetes
    watch once every resource has been listed).  The source opens it; the resolver reads it
    for every cluster name, because an NXDOMAIN for a service that does exist would be
    cached by clients."""

    __slots__ = ("is_open",)

    def __init__(self, is_open: bool = True) -> None:
        self.is_open = is_open

    def open(self) -> None:
        self.is_open = True

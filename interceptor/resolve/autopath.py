"""Autopath: server-side search-path completion for pods whose search list is known.

A pod with ``ndots:5`` asks ``api.example.com`` as ``api.example.com.<ns>.svc.<zone>``, then
``...svc.<zone>``, ``...<zone>``, the node's search domains, and only then the name itself:
up to five round trips for one lookup.  When the first expansion comes from a pod we know,
the resolver walks the rest of that pod's search list itself (cluster candidates from the
map, the others through the cache) and answers the first expansion with a CNAME to the
first candidate that exists, plus its records (CoreDNS's ``autopath``).

The search list is the one kubelet wrote into the pod's resolv.conf: for ``ClusterFirst``
``<ns>.svc.<zone> svc.<zone> <zone>``, then the node's own search domains, then
``spec.dnsConfig.searches``; for ``dnsPolicy: None`` only the latter.  Unlike CoreDNS, which
assumes the ClusterFirst list for every pod, a pod's custom search domains are followed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from interceptor.dns import wire
from interceptor.model.objects import Pod
from interceptor.model.servicemap import ServiceMap

MAX_SEARCH = 32
"""kubelet's limit on search domains (MaxDNSSearchPaths since Kubernetes 1.28)."""

MAX_UPSTREAM_CANDIDATES = 6
"""Candidates outside the cluster zone one walk may ask upstream (the bare name, the node's
search domains, a pod's own ones).  A pod whose list has more gets no autopath: its own
spec must not turn each of its packets into dozens of upstream queries."""

REBUILD_INTERVAL = 1.0
"""Seconds between rebuilds of the client index while the map keeps changing.  A pod's IP
reaches the map with the pod's sandbox, before its containers start and ask anything."""


def search_list(pod: Pod, zone: str, node_search: tuple[str, ...]) -> tuple[str, ...] | None:
    """The search line kubelet gives ``pod`` (pkg/kubelet/network/dns), or None when it
    cannot be known: hostNetwork pods share the node's address with every other one."""
    if pod.host_network:
        return None
    if pod.dns_policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
        base: tuple[str, ...] = (f"{pod.namespace}.svc.{zone}", f"svc.{zone}", zone)
        domains = base + node_search + pod.dns_searches
    elif pod.dns_policy == "None":
        domains = pod.dns_searches
    elif pod.dns_policy == "Default":
        domains = node_search + pod.dns_searches
    else:
        return None
    return tuple(dict.fromkeys(d for d in domains if d))[:MAX_SEARCH]


def expansion(qname: str, search: tuple[str, ...], zone: str) -> str | None:
    """The base name when ``qname`` is the first expansion of ``search`` (``<base>.<first>``)
    and that first domain is in the cluster zone; else None.  Names outside the zone are not
    ours to complete (as in CoreDNS, autopath works inside its zones)."""
    if not search:
        return None
    first = search[0]
    if not (first == zone or first.endswith("." + zone)):
        return None
    if len(qname) <= len(first) + 1 or not qname.endswith("." + first):
        return None
    return qname[: -len(first) - 1]


class ClientIndex:
    """Client IP -> search list, from the pods in the service map.

    Rebuilt from the map when it changed, at most every ``REBUILD_INTERVAL`` seconds (the map
    offers no per-pod events, and a scan of every object per query would cost too much).  An
    IP held by pods that disagree on their search list (a finished pod and its IP's new
    owner) maps to nothing: autopath then stays out of the way.
    """

    def __init__(
        self,
        smap: ServiceMap,
        node_search: tuple[str, ...],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.smap = smap
        self.node_search = node_search
        self.clock = clock
        self._by_ip: dict[str, tuple[str, ...] | None] = {}
        self._generation = -1
        self._built = float("-inf")

    def search(self, ip: str) -> tuple[str, ...] | None:
        smap = self.smap
        if smap.generation != self._generation:
            now = self.clock()
            if now - self._built >= REBUILD_INTERVAL:
                self._rebuild()
                self._built = now
        return self._by_ip.get(ip)

    def _rebuild(self) -> None:
        smap = self.smap
        out: dict[str, tuple[str, ...] | None] = {}
        for obj in smap.objects.values():
            if not isinstance(obj, Pod) or obj.host_network:
                continue
            search = search_list(obj, smap.zone, self.node_search)
            for ip in obj.ips:
                if ip in out and out[ip] != search:
                    out[ip] = None
                else:
                    out[ip] = search
        self._by_ip = out
        self._generation = smap.generation


def candidate_wires(
    qname_wire: bytes, first: str, rest: tuple[str, ...]
) -> list[tuple[bytes, str]]:
    """(wire, lowercased name) of every candidate after the first: ``<base>.<domain>`` for
    each remaining domain, then ``<base>`` alone.  ``qname_wire`` is the question name as the
    client sent it, so the candidates keep the client's case.  Names over 255 octets are
    skipped, as a stub resolver skips them."""
    base_wire = qname_wire[: len(qname_wire) - len(wire.encode_name(first))]
    out: list[tuple[bytes, str]] = []
    for domain in (*rest, ""):
        full = base_wire + wire.encode_name(domain)
        if len(full) > wire.MAX_NAME_WIRE:
            continue
        name, _ = wire.decode_name_plain(full, 0)
        out.append((full, name.lower()))
    return out

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

import asyncio
import time
from collections.abc import Awaitable, Callable

from interceptor.dns import wire
from interceptor.dns.message import Answer, Query, assemble, question_end
from interceptor.dns.records import sections
from interceptor.model.objects import Pod
from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.decision import Client, Decision, Rule
from interceptor.telemetry.stats import RequestStats

Ask = Callable[[bytes, bool, Client], Awaitable[Decision]]
"""The resolver's own decision for one candidate, asked as the pod would ask it."""

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


class Autopath:
    """Completes a known pod's search list on the server (see the module's docstring)."""

    def __init__(
        self,
        smap: ServiceMap,
        node_search: tuple[str, ...],
        ask: Ask,
        stats: RequestStats,
        max_udp: int,
    ) -> None:
        self.smap = smap
        self.clients = ClientIndex(smap, node_search)
        self.ask = ask
        self.stats = stats
        self.max_udp = max_udp

    async def complete(
        self, query: Query, tcp: bool, client: Client, limit: int | None
    ) -> Decision | None:
        """``query`` is NXDOMAIN here; if it is the first search expansion of a known pod,
        the answer with the first candidate of that pod's search list that exists.

        Each candidate is resolved as the pod itself would ask it (same flags and EDNS), so
        cluster candidates come from the map and the others share the cache with the pod's
        own queries; the upstream ones are asked together, not one after another.  Then, in
        the pod's order, the first candidate that is not NXDOMAIN decides:

        * it has records: CNAME from the asked name to it, then its records (a hit);
        * it is NODATA and every later candidate is NXDOMAIN: CNAME plus that NODATA, which
          is where the pod's own search would end too, whatever its stub resolver;
        * anything else (SERVFAIL, or NODATA with more to find later, where glibc searches
          on and musl stops): None, so the asked name's own NXDOMAIN stands and the pod's
          own search goes on exactly as without autopath (a miss).  Nothing found is a miss.
        """
        search = self.clients.search(client[0])
        if search is None:
            return None
        if expansion(query.qname, search, self.smap.zone) is None:
            return None
        qname_wire = query.data[12 : query.question_end - 4]
        tail = query.data[query.question_end - 4 :]  # QTYPE, QCLASS, the client's OPT
        candidates = candidate_wires(qname_wire, search[0], search[1:])
        local = [self.smap.in_zone(name) for _, name in candidates]
        if local.count(False) > MAX_UPSTREAM_CANDIDATES:
            return None  # one packet must not become dozens of upstream queries
        tasks: dict[int, asyncio.Future[Decision]] = {}

        def start(i: int) -> None:
            synthetic = query.data[:12] + candidates[i][0] + tail
            tasks[i] = asyncio.ensure_future(self.ask(synthetic, tcp, client))

        results: list[Decision] = []
        decided: int | None = None
        try:
            for i in range(len(candidates)):
                if i not in tasks:
                    if local[i]:
                        start(i)  # from the map: no I/O, nothing to overlap
                    else:
                        # The first upstream candidate: ask it and every later one at once,
                        # one round trip in all instead of one each.
                        for j in range(i, len(candidates)):
                            if not local[j]:
                                start(j)
                results.append(await tasks[i])
                decided = choose([r.reply for r in results], len(candidates))
                if decided is not None:
                    break
        finally:
            for task in tasks.values():
                task.cancel()  # their upstream queries still complete, into the cache
        if decided is None or decided < 0:
            self.stats.autopath_result(False)
            return None
        found = results[decided]
        composed = None if found.reply is None else self._cname_to(query, found.reply, limit)
        self.stats.autopath_result(composed is not None)
        if composed is None:
            return None
        return Decision(composed, found.source, Rule.AUTOPATH, target=candidates[decided][1])

    def _cname_to(self, query: Query, reply: bytes, limit: int | None) -> bytes | None:
        """The answer to ``query``: a CNAME to the question of ``reply`` (a full response for
        the candidate), then ``reply``'s records.  The CNAME lives no longer than the
        cluster's negative TTL: a service created meanwhile under an earlier candidate would
        have ended the pod's own search there."""
        parts = sections(reply)
        if parts is None:
            return None
        target = reply[12 : question_end(reply) - 4]
        ttl = min([self.smap.ttl, *(parts.answer_ttls or parts.negative_ttls)])
        cname = wire.rr(wire.QNAME_POINTER, wire.CNAME, ttl, target)
        body = cname + b"".join(parts.answer + parts.authority + parts.additional)
        answer = Answer(
            parts.rcode,
            parts.aa,
            1 + len(parts.answer),
            len(parts.authority),
            len(parts.additional),
            body,
        )
        return assemble(query, answer, self.max_udp, limit)


def choose(replies: list[bytes | None], total: int) -> int | None:
    """Which candidate answers (its index), -1 for none (the asked name's NXDOMAIN stands),
    or None while the replies so far (in search order) cannot tell yet."""
    for i, reply in enumerate(replies):
        if reply is None or len(reply) < 12:
            return -1
        rcode = reply[3] & 15
        if rcode == wire.NXDOMAIN:
            continue
        if rcode != wire.NOERROR:
            return -1
        if reply[6:8] != b"\x00\x00":
            return i  # records (or a CNAME chain): the pod's search would stop here
        # NODATA: final only if nothing after it exists (glibc searches on, musl stops).
        later = replies[i + 1 :]
        if any(r is None or len(r) < 12 or r[3] & 15 != wire.NXDOMAIN for r in later):
            return -1
        return i if len(replies) == total else None
    return None if len(replies) < total else -1

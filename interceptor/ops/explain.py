"""Why the running resolver answered a name the way it did: the rule it reports, in words,
and the Kubernetes objects the answer comes from.  Also the list of services it knows.

The rule is the resolver's own (:class:`~interceptor.resolve.decision.Decision`): nothing
here repeats its decisions.  What this module adds is description: what kind of records a
table answer holds (a ClusterIP, a headless endpoint, SRV ...), whether an NXDOMAIN is
search-path junk, and which objects in the map hold the name, found from the name's
structure (``<svc>.<ns>.svc.<zone>``, ``<ip>.in-addr.arpa`` ...) and the map's objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

import dnslib

from interceptor.dns import wire
from interceptor.dns.codes import rcode_text, type_text
from interceptor.model.objects import EndpointSlice, Namespace, Pod, Service, ServiceEntry
from interceptor.model.servicemap import ServiceMap
from interceptor.model.visibility import explain as explain_visibility
from interceptor.model.visibility import wildcard_covers
from interceptor.resolve.decision import Client, Decision, Rule
from interceptor.resolve.resolver import Resolver


@dataclass
class Explanation:
    rule: str
    """Short identifier: the resolver's rule, or for a table answer the kind of its records
    (clusterip-service, headless-service, headless-endpoint, srv, ptr, externalname,
    mesh-vip, apex, nodata), and for a cluster NXDOMAIN search-path-junk or nxdomain."""
    detail: str
    """One sentence for a person."""
    objects: list[str] = field(default_factory=list)
    """``Kind namespace/name`` of every object the answer comes from."""
    upstreams: list[str] = field(default_factory=list)
    """For forwarded names: the servers asked, in order."""
    visibility: list[str] = field(default_factory=list)
    """For a name some ServiceEntry names: who sees which entry, and so what this client
    got (``exportTo``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FIXED = {
    Rule.DROPPED: "not a DNS query: dropped without an answer",
    Rule.MALFORMED: "the query is malformed or uses an opcode we do not serve",
    Rule.BADVERS: "EDNS version other than 0: BADVERS (RFC 6891)",
    Rule.REFUSED: "zone transfers and classes other than IN are refused (they would list "
    "every service)",
    Rule.NOT_SYNCED: "SERVFAIL: the first full sync from the source is not done (an NXDOMAIN "
    "now would be cached by clients)",
    Rule.POD_RECORD: "pod A/AAAA synthesized from the dashed IP in the name "
    "(--pod-records insecure)",
    Rule.CNAME_LOOP: "SERVFAIL: the ExternalName chain is longer than the resolver follows",
    Rule.NOT_ALLOWED: "REFUSED: the server the pod asked is not an allowed forwarding target "
    "(--allow-forward), so the node does not relay to it",
}


def describe(
    smap: ServiceMap,
    decision: Decision,
    name: str,
    qtype: int,
    client: str | None = None,
    namespace: str | None = None,
) -> Explanation:
    """The resolver's ``decision`` for (``name``, ``qtype``) asked by ``client`` (an address,
    in ``namespace`` when it is a known pod's), in words and objects."""
    name = name.strip().rstrip(".").lower()
    why = _describe(smap, decision, name, qtype)
    if not smap.in_zone(name):
        why.visibility = _visibility(smap, name, client, namespace)
    return why


def for_client(
    resolver: Resolver, decision: Decision, name: str, qtype: int, client: Client | None
) -> Explanation:
    """:func:`describe`, for the client that asked: its address, and its namespace when it
    is a known pod's (what a mesh host's answer depends on)."""
    return describe(
        resolver.smap,
        decision,
        name,
        qtype,
        client[0] if client else None,
        resolver.client_namespace(client),
    )


def _visibility(
    smap: ServiceMap, name: str, client: str | None, namespace: str | None
) -> list[str]:
    lines = explain_visibility(
        smap.mesh_entries(), name, namespace, smap.settings.default_export_to
    )
    if not lines:
        return []
    if client is None:
        who = "no client given (--from): as for an unknown client, which sees only entries "
        who += "exported to everyone"
    elif namespace is None:
        who = f"{client} is no known pod: it sees only entries exported to everyone"
    else:
        who = f"{client} is a pod in namespace {namespace}"
    seen = smap.mesh_answer(name, namespace)
    if seen is None:
        verdict = "so no entry gives it an address here: the name is forwarded"
    else:
        verdict = f"so it is answered {', '.join(seen.v4 + seen.v6) or 'NODATA'} ({seen.host})"
    return [who, *lines, verdict]


def _describe(smap: ServiceMap, decision: Decision, name: str, qtype: int) -> Explanation:
    rule = decision.rule
    servers = [str(s) for s in decision.upstreams]
    if rule in FIXED:
        objs: list[str] = []
        if rule == Rule.POD_RECORD:
            ns = name[: -len(f".pod.{smap.zone}")].split(".")[1]
            objs = [f"Namespace {ns}"] if ("Namespace", "", ns) in smap.objects else []
        return Explanation(rule, FIXED[rule], objs)
    if rule == Rule.TABLE:
        empty = decision.reply is not None and decision.reply[6:8] == b"\x00\x00"
        return _table_kind(smap, name, qtype, empty)
    if rule == Rule.EMPTY_NON_TERMINAL:
        return Explanation(
            "empty-non-terminal" if qtype != wire.ANY else "nodata",
            "NODATA: the name exists (names below it do) but has no records of this type",
            _objects_for(smap, name),
        )
    if rule == Rule.NXDOMAIN:
        return _nxdomain(smap, name)
    if rule == Rule.AUTOPATH:
        return Explanation(
            rule,
            "the rest of the client's search list was tried on the server; CNAME to the "
            f"first name that exists, {decision.target}",
            _objects_for(smap, name),
        )
    if rule == Rule.MESH_SCOPED:
        return Explanation(
            rule,
            "mesh host (ServiceEntry) as the client's namespace sees it (exportTo)",
            _service_entries(smap, name, wildcard=smap.mesh_host(name) is None),
        )
    if rule == Rule.MESH_WILDCARD:
        return Explanation(
            rule,
            f"mesh wildcard host *.{_wild_suffix(smap, name)}: its addresses",
            _service_entries(smap, name, wildcard=True),
        )
    if rule == Rule.EXTERNALNAME:
        where = (
            "from the service map"
            if decision.target is None or smap.in_zone(decision.target)
            else f"through the upstream ({', '.join(servers)})"
            if servers
            else "from the mesh"
        )
        return Explanation(
            rule,
            f"ExternalName: CNAME to {decision.target}, then its records {where}",
            _objects_for(smap, name),
            servers,
        )
    if rule == Rule.CACHED:
        return Explanation(rule, f"answered from the node cache ({decision.via})", [], servers)
    if rule == Rule.STALE:
        return Explanation(
            rule,
            "every upstream failed: an expired cached answer was served (RFC 8767)",
            [],
            servers,
        )
    if rule == Rule.UPSTREAM_FAILED:
        return Explanation(rule, f"SERVFAIL: no upstream answered ({decision.via})", [], servers)
    return Explanation(Rule.FORWARDED, decision.via or "not ours: forwarded", [], servers)


def _table_kind(smap: ServiceMap, name: str, qtype: int, empty: bool) -> Explanation:
    """What a precomputed answer holds, from the name's structure and the map's objects."""
    zone = smap.zone
    objs = _objects_for(smap, name)
    if empty:
        return Explanation(
            "nodata", f"NODATA: the name has records, but none of type {type_text(qtype)}", objs
        )
    if name == zone or name == f"dns-version.{zone}" or name == f"ns.dns.{zone}":
        return Explanation("apex", "the zone's own records (SOA, NS, schema version)", objs)
    if name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
        return Explanation("ptr", "reverse name of a ClusterIP or a ready endpoint", objs)
    if smap.mesh_host(name) is not None:
        return Explanation("mesh-vip", "mesh host (ServiceEntry): its virtual IP(s)", objs)
    parts = _svc_parts(name, zone)
    if parts is None:
        return Explanation("table", "precomputed answer", objs)
    prefix, svc_name, ns = parts
    svc = smap.objects.get(("Service", ns, svc_name))
    if isinstance(svc, Service):
        if prefix.startswith("_") or qtype == wire.SRV:
            return Explanation("srv", "SRV records of the service's named ports", objs)
        if svc.headless:
            if prefix:
                return Explanation(
                    "headless-endpoint", "a headless service's endpoint by hostname", objs
                )
            return Explanation(
                "headless-service", "headless service: one record per ready endpoint", objs
            )
        return Explanation("clusterip-service", "ClusterIP service: its cluster IP(s)", objs)
    return Explanation("table", "precomputed answer", objs)


def _nxdomain(smap: ServiceMap, name: str) -> Explanation:
    zone = smap.zone
    for suffix in sorted(_search_suffixes(smap), key=len, reverse=True):
        if name.endswith("." + suffix):
            head = name[: -len(suffix) - 1]
            # A dotted name plus a search suffix is what ndots:5 makes of "example.com";
            # a single label is just a name that does not exist.
            if "." in head:
                return Explanation(
                    "search-path-junk",
                    f"NXDOMAIN, answered locally and never forwarded: {head!r} with the "
                    f"search-path suffix {suffix!r} (ndots:5)",
                    [f"Namespace {suffix.split('.')[0]}"]
                    if suffix.endswith(f".svc.{zone}") and suffix != f"svc.{zone}"
                    else [],
                )
    return Explanation(
        "nxdomain",
        f"NXDOMAIN: no such name under the cluster zone {zone} (never forwarded)",
    )


def _search_suffixes(smap: ServiceMap) -> set[str]:
    """What glibc appends with a kube-style resolv.conf: <ns>.svc.<zone>, svc.<zone>, <zone>."""
    zone = smap.zone
    out = {f"svc.{zone}", zone}
    for kind, ns, name in smap.objects:
        if kind == "Namespace":
            out.add(f"{name}.svc.{zone}")
        elif ns:
            out.add(f"{ns}.svc.{zone}")
    return out


def _svc_parts(name: str, zone: str) -> tuple[str, str, str] | None:
    """``[prefix.]<svc>.<ns>.svc.<zone>`` -> (prefix, svc, ns)."""
    suffix = f".svc.{zone}"
    if not name.endswith(suffix):
        return None
    labels = name[: -len(suffix)].split(".")
    if len(labels) < 2:
        return None
    return ".".join(labels[:-2]), labels[-2], labels[-1]


def _objects_for(smap: ServiceMap, name: str) -> list[str]:
    """The objects whose records or existence make up ``name``."""
    zone = smap.zone
    out: list[str] = []
    parts = _svc_parts(name, zone)
    if parts is not None:
        prefix, svc_name, ns = parts
        if isinstance(smap.objects.get(("Service", ns, svc_name)), Service):
            out.append(f"Service {ns}/{svc_name}")
            host = prefix.split(".")[0] if prefix and not prefix.startswith("_") else None
            for obj in smap.objects.values():
                if (
                    isinstance(obj, EndpointSlice)
                    and obj.namespace == ns
                    and obj.service == svc_name
                ):
                    if host is None or any(
                        (ep.hostname or wire.dashed_ip(ip)) == host
                        for ep in obj.endpoints
                        for ip in ep.addresses
                    ):
                        out.append(f"EndpointSlice {ns}/{obj.name}")
    elif name.endswith(".svc." + zone):
        ns = name[: -len(".svc." + zone)]
        if "." not in ns and isinstance(smap.objects.get(("Namespace", "", ns)), Namespace):
            out.append(f"Namespace {ns}")
    ip = _reverse_ip(name)
    if ip is not None:
        for obj in smap.objects.values():
            if isinstance(obj, Service) and ip in obj.cluster_ips:
                out.append(f"Service {obj.namespace}/{obj.name}")
            elif isinstance(obj, EndpointSlice) and any(ip in ep.addresses for ep in obj.endpoints):
                out.append(f"EndpointSlice {obj.namespace}/{obj.name}")
    if name.endswith(".pod." + zone):
        for obj in smap.objects.values():
            if isinstance(obj, Pod) and any(
                name == f"{wire.dashed_ip(i)}.{obj.namespace}.pod.{zone}" for i in obj.ips
            ):
                out.append(f"Pod {obj.namespace}/{obj.name}")
    if name in (zone, f"dns-version.{zone}", f"ns.dns.{zone}"):
        dns_ns, _, dns_name = smap.settings.dns_service.partition("/")
        if isinstance(smap.objects.get(("Service", dns_ns, dns_name)), Service):
            out.append(f"Service {dns_ns}/{dns_name}")
    out += _service_entries(smap, name, wildcard=False)
    return list(dict.fromkeys(out))


def _reverse_ip(name: str) -> str | None:
    try:
        if name.endswith(".in-addr.arpa"):
            return str(ipaddress.ip_address(".".join(reversed(name[:-13].split(".")))))
        if name.endswith(".ip6.arpa"):
            nibbles = "".join(reversed(name[:-9].split(".")))
            return str(ipaddress.ip_address(int(nibbles, 16)))
    except ValueError:
        return None
    return None


def _wild_suffix(smap: ServiceMap, name: str) -> str:
    """The most specific wildcard host covering ``name`` (as the resolver picks it)."""
    suffixes = [
        host[2:]
        for o in smap.objects.values()
        if isinstance(o, ServiceEntry)
        for host in o.hosts
        if host.startswith("*.") and name.endswith(host[1:])
    ]
    return max(suffixes, key=len, default=name.partition(".")[2])


def _service_entries(smap: ServiceMap, name: str, wildcard: bool) -> list[str]:
    out = []
    for obj in smap.objects.values():
        if not isinstance(obj, ServiceEntry):
            continue
        for host in obj.hosts:
            if host == name or (wildcard and wildcard_covers(host, name)):
                out.append(f"ServiceEntry {obj.namespace}/{obj.name}")
                break
    return out


def services(smap: ServiceMap, name: str | None = None) -> list[dict[str, Any]]:
    """Services and mesh hosts the resolver answers for; ``name`` filters by service name,
    ``namespace/name`` or a DNS name."""
    zone = smap.zone
    want = name.strip().rstrip(".").lower() if name else None
    slices: dict[tuple[str, str], list[EndpointSlice]] = {}
    for obj in smap.objects.values():
        if isinstance(obj, EndpointSlice) and obj.service is not None:
            slices.setdefault((obj.namespace, obj.service), []).append(obj)
    out: list[dict[str, Any]] = []
    for obj in smap.objects.values():
        if isinstance(obj, Service):
            dns = f"{obj.name}.{obj.namespace}.svc.{zone}"
            if want is not None and want not in (obj.name, f"{obj.namespace}/{obj.name}", dns):
                continue
            eps = slices.get((obj.namespace, obj.name), [])
            ready = sorted(
                {
                    ip
                    for s in eps
                    for ep in s.endpoints
                    if ep.ready or obj.publish_not_ready
                    for ip in ep.addresses
                }
            )
            kind = (
                "ExternalName"
                if obj.external_name is not None
                else "Headless"
                if obj.headless
                else "ClusterIP"
            )
            out.append(
                {
                    "kind": "Service",
                    "namespace": obj.namespace,
                    "name": obj.name,
                    "type": kind,
                    "dns_name": dns,
                    "addresses": list(obj.cluster_ips) if kind == "ClusterIP" else ready,
                    "external_name": obj.external_name,
                    "ports": [
                        f"{p.name + ':' if p.name else ''}{p.port}/{p.protocol.lower()}"
                        for p in obj.ports
                    ],
                    "ready_endpoints": len(ready),
                    "endpoint_slices": sorted(s.name for s in eps),
                }
            )
        elif isinstance(obj, ServiceEntry):
            for host in obj.hosts:
                if want is not None and want not in (
                    obj.name,
                    f"{obj.namespace}/{obj.name}",
                    host,
                ):
                    continue
                # As the entry's own namespace sees the host (exportTo may hide it from
                # others, or another entry may decide it for them).
                mesh = smap.mesh_host(host, obj.namespace) or smap.mesh_host(host)
                addrs = list(mesh.v4 + mesh.v6) if mesh is not None else []
                out.append(
                    {
                        "kind": "ServiceEntry",
                        "namespace": obj.namespace,
                        "name": obj.name,
                        "type": "mesh-wildcard" if host.startswith("*") else "mesh",
                        "dns_name": host,
                        "addresses": addrs,
                        "external_name": None,
                        "ports": [],
                        "ready_endpoints": 0,
                        "endpoint_slices": [],
                        "export_to": list(obj.export_to or smap.settings.default_export_to),
                    }
                )
    out.sort(key=lambda s: (s["namespace"], s["name"], s["dns_name"]))
    return out


def reply_to_json(reply: bytes) -> dict[str, Any]:
    """A DNS response as {rcode, flags, answer, authority, additional} with text records."""
    msg = dnslib.DNSRecord.parse(reply)
    h = msg.header

    def rrs(section: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": str(r.rname).rstrip(".") or ".",
                "type": type_text(r.rtype),
                "ttl": r.ttl,
                "data": str(r.rdata),
            }
            for r in section
            if r.rtype != wire.OPT
        ]

    flags = [f for f, on in (("aa", h.aa), ("tc", h.tc), ("rd", h.rd), ("ra", h.ra)) if on]
    return {
        "rcode": rcode_text(h.rcode),
        "flags": flags,
        "answer": rrs(msg.rr),
        "authority": rrs(msg.auth),
        "additional": rrs(msg.ar),
    }

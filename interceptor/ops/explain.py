"""Why the running resolver answers a name the way it does: which rule, and which Kubernetes
objects the answer comes from.  Also the list of services it knows.

The rule is found by walking the same decisions as :meth:`Resolver.resolve` in the same
order (readiness, the precomputed table, the cluster zone, ExternalName, pod records,
existence, mesh wildcards, forwarding) using only the resolver's and the service map's
public views; the objects are found from the name's structure
(``<svc>.<ns>.svc.<zone>``, ``<ip>.in-addr.arpa`` ...) and the map's objects.  The answer
itself is not predicted here: the admin endpoint runs the real resolver for it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

import dnslib

from interceptor.dns import wire
from interceptor.model.objects import EndpointSlice, Namespace, Pod, Service, ServiceEntry
from interceptor.resolve.resolver import Resolver

Client = tuple[str, int]


@dataclass
class Explanation:
    rule: str
    """Short identifier: clusterip-service, headless-service, headless-endpoint, srv, ptr,
    externalname, mesh-vip, mesh-wildcard, pod-record, apex, nodata, empty-non-terminal,
    search-path-junk, nxdomain, not-synced, refused, forwarded, cached, autopath."""
    detail: str
    """One sentence for a person."""
    objects: list[str] = field(default_factory=list)
    """``Kind namespace/name`` of every object the answer comes from."""
    upstreams: list[str] = field(default_factory=list)
    """For forwarded names: the servers asked, in order."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def qtype_code(text: str) -> int:
    """``A``, ``aaaa``, ``TYPE65`` or ``65`` -> the type number; ValueError if unknown."""
    t = text.strip().upper()
    if t.isdigit():
        return int(t)
    if t.startswith("TYPE") and t[4:].isdigit():
        return int(t[4:])
    try:
        code = getattr(dnslib.QTYPE, t)
    except (dnslib.DNSError, AttributeError):
        code = None
    if not isinstance(code, int):
        raise ValueError(f"unknown query type {text!r}")
    return code


def qtype_text(code: int) -> str:
    try:
        return str(dnslib.QTYPE[code])
    except Exception:  # dnslib raises its own error for unknown numbers
        return f"TYPE{code}"


def explain(resolver: Resolver, qname: str, qtype: int, client: Client | None) -> Explanation:
    smap = resolver.smap
    name = qname.strip().rstrip(".").lower()
    zone = smap.zone
    if qtype in (wire.AXFR, wire.IXFR):
        return Explanation("refused", "zone transfers are refused (they would list every service)")
    in_zone = smap.in_zone(name)
    if in_zone and not resolver.ready:
        return Explanation(
            "not-synced",
            "SERVFAIL: the first full sync from the source is not done (an NXDOMAIN now "
            "would be cached by clients)",
        )
    key = wire.encode_name(name) + qtype.to_bytes(2, "big")
    hit = smap.answers.get(key)
    if hit is not None:
        return _table_hit(resolver, name, qtype, hit.an == 0)
    if in_zone:
        target = smap.cname(name)
        if target is not None:
            return _externalname(resolver, name, target)
        if resolver.pod_record_ip(name) is not None:
            ns = name[: -len(f".pod.{zone}")].split(".")[1]
            return Explanation(
                "pod-record",
                "pod A/AAAA synthesized from the dashed IP in the name (--pod-records insecure)",
                [f"Namespace {ns}"] if _has(resolver, ("Namespace", "", ns)) else [],
            )
        if smap.exists(name):
            return Explanation(
                "empty-non-terminal" if qtype != wire.ANY else "nodata",
                "NODATA: the name exists (names below it do) but has no records of this type",
                _objects_for(resolver, name),
            )
        return _nxdomain(resolver, name)
    wild = smap.mesh_wildcard(name)
    if wild is not None and qtype in (wire.A, wire.AAAA):
        return Explanation(
            "mesh-wildcard",
            f"mesh wildcard host *.{_wild_suffix(resolver, name)}: its addresses",
            _service_entries(resolver, name, wildcard=True),
        )
    servers = [str(s) for s in resolver.upstreams_for(client, False, name)]
    return Explanation("forwarded", _forward_reason(resolver, name, client), [], servers)


def _table_hit(resolver: Resolver, name: str, qtype: int, empty: bool) -> Explanation:
    smap = resolver.smap
    zone = smap.zone
    objs = _objects_for(resolver, name)
    if empty:
        return Explanation(
            "nodata", f"NODATA: the name has records, but none of type {qtype_text(qtype)}", objs
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
    svc = resolver.smap.objects.get(("Service", ns, svc_name))
    if isinstance(svc, Service):
        if prefix.startswith("_") or qtype == wire.SRV:
            return Explanation("srv", "SRV records of the service's named ports", objs)
        if svc.external_name is not None:
            return Explanation("externalname", f"ExternalName: CNAME to {svc.external_name}", objs)
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


def _externalname(resolver: Resolver, name: str, target: str) -> Explanation:
    objs = _objects_for(resolver, name)
    where = (
        "from the service map"
        if resolver.smap.in_zone(target)
        else "through the upstream ("
        + ", ".join(str(s) for s in resolver.upstreams_for(None, False, target))
        + ")"
    )
    return Explanation(
        "externalname", f"ExternalName: CNAME to {target}, then its records {where}", objs
    )


def _nxdomain(resolver: Resolver, name: str) -> Explanation:
    zone = resolver.smap.zone
    for suffix in sorted(_search_suffixes(resolver), key=len, reverse=True):
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


def _search_suffixes(resolver: Resolver) -> set[str]:
    """What glibc appends with a kube-style resolv.conf: <ns>.svc.<zone>, svc.<zone>, <zone>."""
    zone = resolver.smap.zone
    out = {f"svc.{zone}", zone}
    for kind, ns, name in resolver.smap.objects:
        if kind == "Namespace":
            out.add(f"{name}.svc.{zone}")
        elif ns:
            out.add(f"{ns}.svc.{zone}")
    return out


def _forward_reason(resolver: Resolver, name: str, client: Client | None) -> str:
    # The zones and servers in effect: flags plus the kube-dns ConfigMap, if one is followed.
    for zone, _servers in resolver.forward_zones:
        if name == zone or name.endswith("." + zone):
            return f"not ours: forwarded to the servers of zone {zone} (--forward, stubDomains)"
    if resolver.default_servers:
        return "not ours: forwarded to --upstream (or upstreamNameservers)"
    if client is not None and resolver.original_destination is not None:
        return (
            "not ours: forwarded to the server the pod asked (its flow's original destination; "
            "without a live flow, to the captured servers)"
        )
    return "not ours: forwarded to the default upstream servers"


def _svc_parts(name: str, zone: str) -> tuple[str, str, str] | None:
    """``[prefix.]<svc>.<ns>.svc.<zone>`` -> (prefix, svc, ns)."""
    suffix = f".svc.{zone}"
    if not name.endswith(suffix):
        return None
    labels = name[: -len(suffix)].split(".")
    if len(labels) < 2:
        return None
    return ".".join(labels[:-2]), labels[-2], labels[-1]


def _has(resolver: Resolver, key: tuple[str, str, str]) -> bool:
    return key in resolver.smap.objects


def _objects_for(resolver: Resolver, name: str) -> list[str]:
    """The objects whose records or existence make up ``name``."""
    smap = resolver.smap
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
    out += _service_entries(resolver, name, wildcard=False)
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


def _wild_suffix(resolver: Resolver, name: str) -> str:
    """The most specific wildcard host covering ``name`` (as the resolver picks it)."""
    suffixes = [
        host[2:]
        for o in resolver.smap.objects.values()
        if isinstance(o, ServiceEntry)
        for host in o.hosts
        if host.startswith("*.") and name.endswith(host[1:])
    ]
    return max(suffixes, key=len, default=name.partition(".")[2])


def _service_entries(resolver: Resolver, name: str, wildcard: bool) -> list[str]:
    out = []
    for obj in resolver.smap.objects.values():
        if not isinstance(obj, ServiceEntry):
            continue
        for host in obj.hosts:
            if host == name or (wildcard and host.startswith("*.") and name.endswith(host[1:])):
                out.append(f"ServiceEntry {obj.namespace}/{obj.name}")
                break
    return out


def services(resolver: Resolver, name: str | None = None) -> list[dict[str, Any]]:
    """Services and mesh hosts the resolver answers for; ``name`` filters by service name,
    ``namespace/name`` or a DNS name."""
    smap = resolver.smap
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
                mesh = smap.mesh_host(host)
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
                "type": qtype_text(r.rtype),
                "ttl": r.ttl,
                "data": str(r.rdata),
            }
            for r in section
            if r.rtype != wire.OPT
        ]

    flags = [f for f, on in (("aa", h.aa), ("tc", h.tc), ("rd", h.rd), ("ra", h.ra)) if on]
    return {
        "rcode": str(dnslib.RCODE[h.rcode]),
        "flags": flags,
        "answer": rrs(msg.rr),
        "authority": rrs(msg.auth),
        "additional": rrs(msg.ar),
    }

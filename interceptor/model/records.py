"""Pure functions from Kubernetes objects to DNS records, following the Kubernetes
DNS-Based Service Discovery specification (kubernetes/dns docs/specification.md, schema
1.1.0) and, where it leaves room, CoreDNS's kubernetes plugin.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from interceptor.dns import wire
from interceptor.model.objects import EndpointSlice, Pod, Service

SCHEMA_VERSION = "1.1.0"


@dataclass(frozen=True, slots=True, order=True)
class Record:
    """One resource record without TTL: owner name (lowercase, no trailing dot), type, rdata."""

    name: str
    rtype: int
    rdata: bytes


@dataclass(slots=True)
class Contribution:
    """What one owner (a service with its slices, a namespace, the apex, the mesh) adds."""

    records: set[Record] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    """Names that exist without records of their own (namespace empty non-terminals)."""

    def add(self, name: str, rtype: int, rdata: bytes) -> None:
        self.records.add(Record(name, rtype, rdata))

    def address(self, name: str, ip: str) -> None:
        rtype, rdata = wire.rdata_address(ip)
        self.records.add(Record(name, rtype, rdata))


def service_records(svc: Service, slices: Iterable[EndpointSlice], zone: str) -> Contribution:
    """Records of a Service and its EndpointSlices (spec sections 2.3 to 2.5)."""
    out = Contribution()
    base = f"{svc.name}.{svc.namespace}.svc.{zone}"
    if svc.external_name is not None:
        out.add(base, wire.CNAME, wire.encode_name(svc.external_name))
        return out
    if not svc.headless:
        for ip in svc.cluster_ips:
            out.address(base, ip)
            out.add(wire.reverse_name(ip), wire.PTR, wire.encode_name(base))
        named = [p for p in svc.ports if p.name]
        for p in named:
            out.add(
                f"_{p.name}._{p.protocol}.{base}", wire.SRV, wire.rdata_srv(0, 100, p.port, base)
            )
        # CoreDNS also answers SRV at the service name itself, one per port.
        for p in svc.ports:
            out.add(base, wire.SRV, wire.rdata_srv(0, 100, p.port, base))
        return out
    # Headless: one record per ready endpoint address; endpoint names are the endpoint's
    # hostname, or else its dashed IP (CoreDNS's endpointHostname).  Endpoints that share a
    # hostname all answer under it.
    targets: dict[str, set[str]] = {}
    ports: set[tuple[str, str, int]] = set()
    for eps in slices:
        for p in eps.ports:
            ports.add((p.name, p.protocol, p.port))
        for ep in eps.endpoints:
            if not (ep.ready or svc.publish_not_ready):
                continue
            for ip in ep.addresses:
                host = ep.hostname or wire.dashed_ip(ip)
                targets.setdefault(f"{host}.{base}", set()).add(ip)
    for target, ips in targets.items():
        for ip in ips:
            out.address(base, ip)
            out.address(target, ip)
            out.add(wire.reverse_name(ip), wire.PTR, wire.encode_name(target))
    if targets:
        # RFC 2782: weights are relative among targets of equal priority; spread 100 evenly.
        weight = max(1, 100 // len(targets))
        for name, proto, port in ports:
            for target in targets:
                srv = wire.rdata_srv(0, weight, port, target)
                out.add(base, wire.SRV, srv)
                if name:
                    out.add(f"_{name}._{proto}.{base}", wire.SRV, srv)
    return out


def namespace_names(namespace: str, zone: str) -> Contribution:
    """``<ns>.svc.<zone>`` and ``<ns>.pod.<zone>`` exist as soon as the namespace does."""
    return Contribution(names={f"{namespace}.svc.{zone}", f"{namespace}.pod.{zone}"})


def pod_records(pod: Pod, zone: str, verified: bool) -> Contribution:
    """With ``pods verified`` a pod's dashed-IP name answers only for its own IPs."""
    out = Contribution(names={f"{pod.namespace}.pod.{zone}"})
    if verified:
        for ip in pod.ips:
            out.address(f"{wire.dashed_ip(ip)}.{pod.namespace}.pod.{zone}", ip)
    return out


def apex_records(zone: str, ttl: int, dns_service: Service | None) -> Contribution:
    """SOA, NS, the schema version, and ``ns.dns.<zone>`` (the NS target) at the apex."""
    out = Contribution(names={f"svc.{zone}", f"pod.{zone}"})
    out.add(zone, wire.SOA, soa_rdata(zone, ttl))
    out.add(zone, wire.NS, wire.encode_name(f"ns.dns.{zone}"))
    out.add(f"dns-version.{zone}", wire.TXT, wire.rdata_txt(SCHEMA_VERSION))
    out.names.add(f"ns.dns.{zone}")
    if dns_service is not None:
        for ip in dns_service.cluster_ips:
            out.address(f"ns.dns.{zone}", ip)
    return out


def soa_rdata(zone: str, ttl: int) -> bytes:
    # Zone transfers are refused, so the serial carries no meaning; a constant keeps every
    # node's answers byte-identical.  MINIMUM is the negative-caching TTL (RFC 2308 4).
    return wire.rdata_soa(f"ns.dns.{zone}", f"hostmaster.{zone}", 1, 7200, 1800, 86400, ttl)

"""Slim, validated copies of the Kubernetes objects DNS needs.

Only the fields that affect answers are kept (a whole client model of a Pod is ~100x larger).
Parsing a malformed object raises :class:`ObjectError` naming the object and the field.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from interceptor.errors import ObjectError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
AUTOALLOCATE_LABEL = "networking.istio.io/enable-autoallocate-ip"
EVERYONE, OWN_NAMESPACE, NO_ONE = "*", ".", "~"
"""Istio's ``exportTo`` keywords; any other value names a namespace."""
EXPORT_KEYWORDS = (EVERYONE, OWN_NAMESPACE, NO_ONE)

Key: TypeAlias = tuple[str, str, str]
"""(kind, namespace, name): the identity of an object in the map."""


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> Key:
        return ("Namespace", "", self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    """Empty for headless and ExternalName services."""
    headless: bool
    external_name: str | None
    ports: tuple[ServicePort, ...]
    publish_not_ready: bool = False

    @property
    def key(self) -> Key:
        return ("Service", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    addresses: tuple[str, ...]
    ready: bool
    hostname: str | None


def pack_endpoints(endpoints: tuple[EndpointAddress, ...]) -> tuple[str | EndpointAddress, ...]:
    """Endpoints as :class:`EndpointSlice` keeps them: one with a single address, ready and
    without a hostname (almost every endpoint) as its address alone.  An EndpointAddress and
    its tuple cost about 110 bytes more an endpoint, 5.5 MB for a cluster of 50,000 pods."""
    return tuple(
        e.addresses[0] if len(e.addresses) == 1 and e.ready and e.hostname is None else e
        for e in endpoints
    )


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str | None
    """The owning service (label ``kubernetes.io/service-name``); None: not a service's."""
    packed: tuple[str | EndpointAddress, ...]
    """The endpoints (:func:`pack_endpoints`); read them as :attr:`endpoints`."""
    ports: tuple[ServicePort, ...]

    @property
    def endpoints(self) -> tuple[EndpointAddress, ...]:
        return tuple(
            EndpointAddress((e,), True, None) if isinstance(e, str) else e for e in self.packed
        )

    @property
    def key(self) -> Key:
        return ("EndpointSlice", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    ips: tuple[str, ...]
    node_name: str | None
    host_network: bool
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    dns_policy: str = "ClusterFirst"
    """``spec.dnsPolicy``: with ``dns_searches``, what kubelet wrote into the pod's
    resolv.conf search line (the resolver's autopath follows it)."""
    dns_searches: tuple[str, ...] = ()
    """``spec.dnsConfig.searches``."""

    @property
    def key(self) -> Key:
        return ("Pod", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    """``spec.addresses``: returned as given.  CIDRs are kept out (they name no one host)."""
    resolution: str
    status_addresses: tuple[tuple[str, str], ...]
    """istiod's ``status.addresses``: (host, address); host "" applies to every host."""
    created: str
    """``metadata.creationTimestamp`` (RFC 3339): older entries win VIP collisions."""
    export_to: tuple[str, ...] = ()
    """``spec.exportTo``: ``*``, ``.``, ``~`` or namespace names; empty: the mesh default
    (:mod:`interceptor.model.visibility`)."""
    endpoints: tuple[str, ...] = ()
    """IP addresses of ``spec.endpoints`` (Istio's DNS proxy answers them for resolution
    NONE with ports); endpoints named by host name or Unix socket are left out."""
    has_ports: bool = False
    autoallocate: bool = True
    """False with the label ``networking.istio.io/enable-autoallocate-ip: "false"``: istiod
    gives the entry no VIP."""

    @property
    def key(self) -> Key:
        return ("ServiceEntry", self.namespace, self.name)


KubeObject: TypeAlias = Namespace | Service | EndpointSlice | Pod | ServiceEntry

KINDS = ("Namespace", "Service", "EndpointSlice", "Pod", "ServiceEntry")
"""Kinds the map understands.  Anything else is skipped by the sources."""

API_VERSIONS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Service": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "Pod": ("v1",),
    "ServiceEntry": (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ),
}


PROTOCOL = re.compile(r"tcp|udp|sctp")

DNS_LABEL = re.compile(r"[a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?")
"""RFC 1123 labels as Kubernetes checks its names, plus the underscore of service labels."""


class _Reader:
    """Typed access to a nested dict that reports the failing path on error."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, path: str, problem: str) -> ObjectError:
        return ObjectError(self.what, path, problem)

    def get(
        self,
        obj: Mapping[str, Any],
        path: str,
        kind: type,
        default: Any = None,
        required: bool = False,
        at: str = "",
    ) -> Any:
        """The value at dotted ``path`` below ``obj``; ``at`` is where ``obj`` itself sits in
        the whole object, so that errors name the full field path."""
        if at:
            try:
                return _Reader(self.what).get(obj, path, kind, default, required)
            except ObjectError as exc:
                raise self.fail(f"{at}.{exc.field}", exc.problem) from None
        cur: Any = obj
        walked: list[str] = []
        for part in path.split("."):
            walked.append(part)
            if cur is None:
                break
            if not isinstance(cur, Mapping):
                raise self.fail(".".join(walked[:-1]), f"expected a mapping, got {_kind(cur)}")
            cur = cur.get(part)
        if cur is None:
            if required:
                raise self.fail(path, "is required")
            return default
        if kind is int and isinstance(cur, bool):
            raise self.fail(path, f"expected an integer, got {_kind(cur)}")
        if not isinstance(cur, kind):
            raise self.fail(path, f"expected {_kind_name(kind)}, got {_kind(cur)} {cur!r:.40}")
        return cur

    def items(self, obj: Mapping[str, Any], path: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The elements of a list of mappings, each with its own path for errors."""
        seq = self.get(obj, path, list, default=[])
        out = []
        for i, item in enumerate(seq):
            if not isinstance(item, Mapping):
                raise self.fail(f"{path}[{i}]", f"expected a mapping, got {_kind(item)}")
            out.append((f"{path}[{i}]", item))
        return out

    def strings(self, obj: Mapping[str, Any], path: str, at: str = "") -> tuple[str, ...]:
        seq = self.get(obj, path, list, default=[], at=at)
        full = f"{at}.{path}" if at else path
        for i, item in enumerate(seq):
            if not isinstance(item, str):
                raise self.fail(f"{full}[{i}]", f"expected a string, got {_kind(item)}")
        return tuple(seq)

    def ip(self, value: str, path: str) -> str:
        try:
            return ipaddress.ip_address(value).compressed
        except ValueError:
            raise self.fail(path, f"{value!r} is not an IP address") from None

    def dns_label(self, value: str, path: str) -> str:
        """A name that becomes one DNS label (a Service's or namespace's name, a port name,
        an endpoint hostname), checked as the API server checks it (RFC 1123 label): the
        YAML source is not validated by anyone else, and a bad label must not reach the
        records."""
        v = value.lower()
        if not DNS_LABEL.fullmatch(v):
            raise self.fail(path, f"{value!r:.70} is not a DNS label (a-z, 0-9, '-'; 63 at most)")
        return v

    def dns_name(self, value: str, path: str, wildcard: bool = False) -> str:
        """A DNS name (RFC 1123 subdomain, 253 at most), lowercased, no trailing dot;
        ``wildcard``: a leading ``*.`` is allowed (mesh hosts)."""
        v = value.rstrip(".").lower()
        body = v[2:] if wildcard and v.startswith("*.") else v
        if len(v) > 253 or not all(DNS_LABEL.fullmatch(label) for label in body.split(".")):
            raise self.fail(path, f"{value!r:.70} is not a DNS name")
        return v

    def mapping(self, obj: Mapping[str, Any], path: str) -> tuple[tuple[str, str], ...]:
        m = self.get(obj, path, Mapping, default={})
        return tuple(sorted((str(k), str(v)) for k, v in m.items()))


def _timestamp(value: object) -> str:
    """RFC 3339 in UTC with a ``Z``, whether YAML gave a string or a datetime."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _kind(value: object) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", list: "a list", bool: "a boolean"}.get(
        kind, "a mapping"
    )


def describe(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` for messages, as far as the object allows."""
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    name = ns = None
    if isinstance(meta, Mapping):
        name, ns = meta.get("name"), meta.get("namespace")
    ident = f"{ns}/{name}" if ns else str(name) if name else "(unnamed)"
    return f"{kind or '(no kind)'} {ident}"


def parse(obj: Mapping[str, Any]) -> KubeObject:
    """Parse one Kubernetes object (as a dict, from YAML or the API) into its slim form."""
    what = describe(obj)
    r = _Reader(what)
    kind = r.get(obj, "kind", str, required=True)
    if kind not in KINDS:
        raise r.fail("kind", f"unsupported kind {kind!r}")
    api = r.get(obj, "apiVersion", str, required=True)
    if api not in API_VERSIONS[kind]:
        raise r.fail("apiVersion", f"{api!r} is not one of {', '.join(API_VERSIONS[kind])}")
    name = r.get(obj, "metadata.name", str, required=True)
    if kind == "Namespace":
        return Namespace(r.dns_label(name, "metadata.name"), r.mapping(obj, "metadata.labels"))
    namespace = sys.intern(
        r.dns_label(r.get(obj, "metadata.namespace", str, default="default"), "metadata.namespace")
    )  # one string per namespace, not one per object (a cluster has 100,000 of them)
    if kind == "Service":
        name = r.dns_label(name, "metadata.name")
    if kind == "Service":
        return _service(r, obj, namespace, name)
    if kind == "EndpointSlice":
        return _endpoint_slice(r, obj, namespace, name)
    if kind == "Pod":
        return _pod(r, obj, namespace, name)
    return _service_entry(r, obj, namespace, name)


def _ports(r: _Reader, obj: Mapping[str, Any], path: str) -> tuple[ServicePort, ...]:
    ports = []
    for p, item in r.items(obj, path):
        number = r.get(item, "port", int, required=True, at=p)
        if not 0 <= number <= 65535:
            raise r.fail(f"{p}.port", f"{number} is out of range")
        protocol = r.get(item, "protocol", str, default="TCP", at=p)
        port_name = r.get(item, "name", str, default="", at=p)
        if port_name:
            port_name = r.dns_label(port_name, f"{p}.name")
        if not PROTOCOL.fullmatch(protocol.lower()):
            raise r.fail(f"{p}.protocol", f"{protocol!r:.40} is not TCP, UDP or SCTP")
        ports.append(_port(port_name, protocol.lower(), number))
    return tuple(ports)


@functools.lru_cache(maxsize=4096)
def _port(name: str, protocol: str, number: int) -> ServicePort:
    """One shared object per distinct port: most Services of a cluster have the same few."""
    return ServicePort(sys.intern(name), sys.intern(protocol), number)


def _service(r: _Reader, obj: Mapping[str, Any], namespace: str, name: str) -> Service:
    svc_type = r.get(obj, "spec.type", str, default="ClusterIP")
    ips = list(r.strings(obj, "spec.clusterIPs"))
    single = r.get(obj, "spec.clusterIP", str, default="")
    if not ips and single:
        ips = [single]
    headless = any(ip == "None" for ip in ips)
    cluster_ips = tuple(r.ip(ip, "spec.clusterIPs") for ip in ips if ip not in ("None", ""))
    external = None
    if svc_type == "ExternalName":
        external = r.get(obj, "spec.externalName", str, required=True).rstrip(".").lower()
        if not external:
            raise r.fail("spec.externalName", "is empty")
        external = r.dns_name(external, "spec.externalName")
        cluster_ips = ()
        headless = False
    publish = r.get(obj, "spec.publishNotReadyAddresses", bool, default=False)
    annotations = r.get(obj, "metadata.annotations", Mapping, default={})
    if str(annotations.get("service.alpha.kubernetes.io/tolerate-unready-endpoints")) == "true":
        publish = True
    if not cluster_ips and external is None:
        headless = True
    return Service(
        namespace, name, cluster_ips, headless, external, _ports(r, obj, "spec.ports"), publish
    )


def _endpoint_slice(r: _Reader, obj: Mapping[str, Any], namespace: str, name: str) -> EndpointSlice:
    address_type = r.get(obj, "addressType", str, required=True)
    labels = r.get(obj, "metadata.labels", Mapping, default={})
    service = labels.get(SERVICE_NAME_LABEL)
    endpoints = []
    for p, item in r.items(obj, "endpoints"):
        addresses = r.strings(item, "addresses", at=p)
        if address_type in ("IPv4", "IPv6"):
            addresses = tuple(r.ip(a, f"{p}.addresses") for a in addresses)
        else:
            addresses = ()  # FQDN endpoints carry no address DNS can serve.
        # discovery.k8s.io/v1 EndpointConditions: a nil "ready" must be read as ready.
        ready = r.get(item, "conditions.ready", bool, default=True, at=p)
        hostname = r.get(item, "hostname", str, default=None, at=p)
        if hostname:
            hostname = r.dns_label(hostname, f"{p}.hostname")
        endpoints.append(EndpointAddress(addresses, ready, hostname or None))
    return EndpointSlice(
        namespace,
        name,
        str(service) if service else None,
        pack_endpoints(tuple(endpoints)),
        _ports(r, obj, "ports") if obj.get("ports") else (),
    )


def _pod(r: _Reader, obj: Mapping[str, Any], namespace: str, name: str) -> Pod:
    ips = [r.get(item, "ip", str, required=True, at=p) for p, item in r.items(obj, "status.podIPs")]
    single = r.get(obj, "status.podIP", str, default="")
    if not ips and single:
        ips = [single]
    return Pod(
        namespace,
        name,
        tuple(r.ip(ip, "status.podIPs") for ip in ips),
        r.get(obj, "spec.nodeName", str, default=None),
        r.get(obj, "spec.hostNetwork", bool, default=False),
        r.mapping(obj, "metadata.labels"),
        r.mapping(obj, "metadata.annotations"),
        r.get(obj, "spec.dnsPolicy", str, default="ClusterFirst") or "ClusterFirst",
        tuple(d.strip(".").lower() for d in r.strings(obj, "spec.dnsConfig.searches")),
    )


def _service_entry(r: _Reader, obj: Mapping[str, Any], namespace: str, name: str) -> ServiceEntry:
    hosts = tuple(
        r.dns_name(h, f"spec.hosts[{i}]", wildcard=True)
        for i, h in enumerate(r.strings(obj, "spec.hosts"))
    )
    if not hosts:
        raise r.fail("spec.hosts", "is required and must not be empty")
    addresses = []
    for i, a in enumerate(r.strings(obj, "spec.addresses")):
        if "/" in a:
            try:
                net = ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise r.fail(f"spec.addresses[{i}]", f"{a!r} is not an IP or CIDR") from None
            if net.num_addresses == 1:
                addresses.append(net.network_address.compressed)
            continue
        addresses.append(r.ip(a, f"spec.addresses[{i}]"))
    resolution = r.get(obj, "spec.resolution", str, default="NONE").upper()
    status = []
    for p, item in r.items(obj, "status.addresses"):
        value = r.get(item, "value", str, required=True, at=p)
        status.append(
            (
                r.get(item, "host", str, default="", at=p).rstrip(".").lower(),
                r.ip(value, f"{p}.value"),
            )
        )
    created = _timestamp(r.get(obj, "metadata.creationTimestamp", object, default=""))
    export_to = []
    for i, value in enumerate(r.strings(obj, "spec.exportTo")):
        if value not in EXPORT_KEYWORDS:
            value = r.dns_label(value, f"spec.exportTo[{i}]")
        export_to.append(value)
    endpoints = []
    for p, item in r.items(obj, "spec.endpoints"):
        address = r.get(item, "address", str, default="", at=p)
        try:
            endpoints.append(ipaddress.ip_address(address).compressed)
        except ValueError:
            continue  # a host name or unix:// socket: nothing DNS can answer with
    labels = r.get(obj, "metadata.labels", Mapping, default={})
    return ServiceEntry(
        namespace,
        name,
        hosts,
        tuple(addresses),
        resolution,
        tuple(status),
        created,
        tuple(sorted(set(export_to))),
        tuple(dict.fromkeys(endpoints)),
        bool(r.get(obj, "spec.ports", list, default=[])),
        str(labels.get(AUTOALLOCATE_LABEL, "")).lower() != "false",
    )

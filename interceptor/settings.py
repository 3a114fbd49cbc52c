"""One settings object, built once from flags (later also environment and file), passed on."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from interceptor.errors import ConfigError


class PodRecords(StrEnum):
    """How ``a-b-c-d.<ns>.pod.<zone>`` names are answered (CoreDNS's ``pods`` option)."""

    DISABLED = "disabled"
    INSECURE = "insecure"
    VERIFIED = "verified"


@dataclass(frozen=True)
class Endpoint:
    """An IP address and port, as given on the command line (``ADDR:PORT`` or ``[V6]:PORT``)."""

    host: str
    port: int

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_v6 else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int = 53) -> Endpoint:
        text = text.strip()
        host, port = text, default_port
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ConfigError(f"{text!r}: missing ']'")
            host = text[1:end]
            rest = text[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"{text!r}: expected ':PORT' after ']'")
                port = _port(text, rest[1:])
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = _port(text, p)
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"{text!r}: {host!r} is not an IP address") from exc
        return cls(host, port)


def _port(text: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError as exc:
        raise ConfigError(f"{text!r}: port {value!r} is not a number") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"{text!r}: port {port} is out of range")
    return port


@dataclass(frozen=True)
class ZoneSettings:
    """What the cluster zone looks like to clients."""

    cluster_domain: str = "cluster.local"
    """The cluster domain (kubelet's ``--cluster-domain``); every name below it is ours."""
    ttl: int = 30
    """TTL of every authoritative answer and of the SOA used for negative answers."""
    pod_records: PodRecords = PodRecords.INSECURE
    """Answering of ``a-b-c-d.<ns>.pod.<zone>``; ``insecure`` like kubeadm's Corefile."""
    ipv6: bool = False
    """Hand out IPv6 mesh VIPs (AAAA); when off, AAAA for mesh hosts is NODATA."""
    dns_service: str = "kube-system/kube-dns"
    """The Service whose ClusterIPs are the zone's name server (apex NS glue)."""


@dataclass(frozen=True)
class ServerSettings:
    """The DNS listeners."""

    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 53))
    """Address and port of the UDP and TCP listeners."""
    max_udp_size: int = 1232
    """Cap on the UDP payload size used with EDNS clients (the DNS flag day 2020 value)."""
    tcp_idle_timeout: float = 10.0
    """Seconds a TCP connection may sit idle before it is closed (RFC 7766 section 6.2.3)."""
    tcp_max_connections: int = 1024
    """Concurrent TCP connections; more are closed at accept."""
    tcp_max_inflight: int = 64
    """Queries a single TCP connection may have in progress at once."""


@dataclass(frozen=True)
class UpstreamSettings:
    """Where names that are not ours go."""

    servers: tuple[Endpoint, ...] = ()
    """Upstream servers, tried in order; empty means the node's resolv.conf."""
    timeout: float = 2.0
    """Seconds to wait for one attempt."""
    attempts: int = 2
    """Attempts per query, spread over the servers."""
    zones: tuple[tuple[str, tuple[Endpoint, ...]], ...] = ()
    """Per-zone servers (``--forward``, like kube-dns stubDomains): zone -> servers."""


@dataclass(frozen=True)
class CacheSettings:
    """The node-wide cache of forwarded answers."""

    size: int = 10000
    """Entries kept at most (0 disables the cache)."""
    min_ttl: int = 0
    """Answers are cached at least this long (seconds)."""
    max_ttl: int = 3600
    """...and at most this long."""
    stale_for: float = 3600
    """Expired answers are kept this long for serve-stale (RFC 8767)."""


@dataclass(frozen=True)
class KubeSettings:
    """Where the Kubernetes API is."""

    kubeconfig: Path | None = None
    """A kubeconfig file; None means in-cluster (the pod's service account)."""
    node_name: str | None = None
    """Watch only this node's pods (field selector), unless every pod is needed."""


@dataclass(frozen=True)
class Settings:
    """Everything a running interceptor needs to know."""

    zone: ZoneSettings = field(default_factory=ZoneSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    source: Path | None = None
    """A YAML file of Kubernetes objects; None means the bundled example cluster."""
    kube: KubeSettings | None = None
    """Watch the Kubernetes API instead of reading ``source``."""
    health: Endpoint | None = None
    """Where /healthz and /readyz are served; None: nowhere."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    metrics: Endpoint | None = None
    """Where Prometheus metrics are served; None: nowhere."""


def resolv_conf_nameservers(path: Path = Path("/etc/resolv.conf")) -> tuple[Endpoint, ...]:
    """The ``nameserver`` lines of a resolv.conf, as endpoints on port 53."""
    servers: list[Endpoint] = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                servers.append(Endpoint.parse(parts[1].split("%")[0]))
            except ConfigError:
                continue
    return tuple(servers)

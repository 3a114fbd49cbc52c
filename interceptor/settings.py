"""One settings object, built once from flags (later also environment and file), passed on."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

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
    default_export_to: tuple[str, ...] = ("*",)
    """ServiceEntries without ``spec.exportTo`` are exported as this (meshConfig's
    ``defaultServiceExportTo``; Istio's default is ``*``, everyone)."""
    dns_service: str = "kube-system/kube-dns"
    """The Service whose ClusterIPs are the zone's name server (apex NS glue)."""


DEFAULT_MAX_UDP = 1232
"""Our EDNS UDP payload size: the DNS flag day 2020 value (no fragmented answers)."""

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/interceptor")
"""Where the agent pins its BPF maps; the inspection verbs look there by default."""

DEFAULT_STATE_DIR = Path("/run/dns-interceptor")
"""Where the agent keeps its state file and admin socket (a host directory in the DaemonSet,
so the inspection verbs find them from the node)."""
STATE_FILE = "state.json"
ADMIN_SOCKET = "admin.sock"
ADDRESS_BOOK = "addresses"
"""The resolver addresses the agent added to the node (datapath/addresses.py)."""

AGENT_HEALTH = Endpoint("0.0.0.0", 8053)
"""The agent's /healthz and /readyz by default (serve: none unless asked)."""
AGENT_METRICS = Endpoint("0.0.0.0", 9253)
"""The agent's Prometheus endpoint by default (serve: none unless asked)."""
DEFAULT_RESOLVER_ADDRESS = "169.254.20.10"
"""NodeLocal DNSCache's link-local address: where the agent's resolver listens."""


@dataclass(frozen=True)
class ServerSettings:
    """The DNS listeners."""

    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 53))
    """Address and port of the UDP and TCP listeners."""
    max_udp_size: int = DEFAULT_MAX_UDP
    """Cap on the UDP payload size used with EDNS clients (the DNS flag day 2020 value)."""
    tcp_idle_timeout: float = 10.0
    """Seconds a TCP connection may sit idle before it is closed (RFC 7766 section 6.2.3)."""
    tcp_max_connections: int = 1024
    """Concurrent TCP connections.  At the limit, a client with fewer connections than the
    busiest one takes that client's idlest connection; anyone else's new one is closed."""
    tcp_client_connections: int = 64
    """Concurrent TCP connections one client may hold; more are closed at accept."""
    tcp_max_inflight: int = 64
    """Queries a single TCP connection may have in progress at once."""
    client_inflight: int = 64
    """Careful-path queries (UDP and TCP) one client may have in progress at once; the rest
    wait their turn, served round-robin between clients (resolve/fair.py)."""
    client_queue: int = 1024
    """...and may have waiting; beyond that a client's queries are dropped (counted)."""


@dataclass(frozen=True)
class KubeDnsConfig:
    """The forwarding part of a kube-dns ConfigMap (``kube-system/kube-dns``)."""

    zones: tuple[tuple[str, tuple[Endpoint, ...]], ...] = ()
    """``stubDomains``: zone -> its name servers."""
    servers: tuple[Endpoint, ...] = ()
    """``upstreamNameservers``: replace the node's resolv.conf for every other name."""


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
    force_tcp: bool = False
    """Ask upstreams over TCP only (pooled, pipelined connections), as NodeLocal DNSCache
    does, so that no answer is lost to UDP drops on the way to the cluster's DNS."""
    kube_dns_config: Path | None = None
    """A kube-dns ConfigMap (YAML file, or the directory a ConfigMap volume mounts) whose
    ``stubDomains`` and ``upstreamNameservers`` add to ``zones`` and ``servers``; flags win.
    Re-read while running."""
    kube_dns: KubeDnsConfig | None = None
    """Its content as read at start-up."""
    allow: tuple[str, ...] = ()
    """Servers a pod's query may be forwarded to besides the captured addresses, the
    upstreams and the ConfigMap's servers: with --capture-all a pod may address any server,
    and the node must not relay its queries to one nobody allowed (a tunnel out)."""


@dataclass(frozen=True)
class AutopathSettings:
    """Server-side search-path completion (CoreDNS's ``autopath``)."""

    enabled: bool = True
    """Answer the first search-path expansion of a name from a known pod with a CNAME to
    the first candidate of that pod's search list that exists."""
    node_search: tuple[str, ...] = ()
    """The node's own search domains (kubelet appends them to every ClusterFirst pod's
    search list, after the three cluster ones)."""


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
    stale_after: float = 1.8
    """The client response timer (RFC 8767 section 5): a name with an expired answer whose
    upstream has not answered by then gets the stale answer, while the refresh goes on.
    Below glibc's 5 s and musl's 2.5 s retry, so the client never times out first."""


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
    autopath: AutopathSettings = field(default_factory=AutopathSettings)
    resolv_conf: Path = Path("/etc/resolv.conf")
    """The node's resolv.conf: ``serve``'s default upstreams, and the node search domains
    (read into ``autopath.node_search`` when the settings are built)."""


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


def resolv_conf_search(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The search domains of a resolv.conf (the last ``search`` or ``domain`` line wins, as
    in glibc), lowercased, without trailing dots; () when the file cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return ()
    search: tuple[str, ...] = ()
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("search", "domain"):
            search = tuple(d.strip(".").lower() for d in parts[1:] if d.strip("."))
    return search


KUBE_DNS_KEYS = ("stubDomains", "upstreamNameservers")


def load_kube_dns_config(path: Path) -> KubeDnsConfig:
    """Read a kube-dns ConfigMap: a YAML file holding the ConfigMap (``kubectl get cm
    kube-dns -o yaml``), or a directory with one file per key (a mounted ConfigMap volume).
    Both keys are JSON, as kube-dns reads them.  Raises ConfigError naming what is wrong."""
    data: Mapping[str, Any]
    if path.is_dir():
        data = {}
        for key in KUBE_DNS_KEYS:
            try:
                data[key] = (path / key).read_text()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(f"{path / key}: {exc.strerror}") from exc
    else:
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(doc, Mapping) or not isinstance(doc.get("data", {}), Mapping):
            raise ConfigError(f"{path}: expected a ConfigMap with a 'data' mapping")
        if doc.get("kind", "ConfigMap") != "ConfigMap":
            raise ConfigError(f"{path}: expected kind ConfigMap, got {doc.get('kind')!r}")
        data = doc.get("data") or {}
    return parse_kube_dns_data(data, str(path))


def parse_kube_dns_data(
    data: Mapping[str, Any], origin: str = "kube-dns ConfigMap"
) -> KubeDnsConfig:
    """``stubDomains`` (``{"acme.local": ["1.2.3.4", "1.2.3.5:5353"]}``) and
    ``upstreamNameservers`` (``["8.8.8.8"]``, at most three, as kube-dns allows).  Other keys
    (``federations``) are not forwarding and are ignored."""

    def decode(key: str) -> Any:
        raw = data.get(key)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str):
            raise ConfigError(f"{origin}: {key}: expected a JSON string, got {type(raw).__name__}")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{origin}: {key}: not valid JSON: {exc}") from exc

    def servers(key: str, value: Any) -> tuple[Endpoint, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{origin}: {key}: expected a list of "IP[:PORT]" strings')
        if not value:
            raise ConfigError(f"{origin}: {key}: the list is empty")
        try:
            return tuple(Endpoint.parse(v) for v in value)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {key}: {exc.detail}") from exc

    zones: list[tuple[str, tuple[Endpoint, ...]]] = []
    stub = decode("stubDomains")
    if stub is not None:
        if not isinstance(stub, dict):
            raise ConfigError(f"{origin}: stubDomains: expected a JSON object of zone -> list")
        for zone, value in stub.items():
            name = zone.strip().strip(".").lower()
            if not name:
                raise ConfigError(f"{origin}: stubDomains: empty zone name {zone!r}")
            zones.append((name, servers(f"stubDomains[{zone!r}]", value)))
    upstream: tuple[Endpoint, ...] = ()
    value = decode("upstreamNameservers")
    if value is not None:
        upstream = servers("upstreamNameservers", value)
        if len(upstream) > 3:
            raise ConfigError(f"{origin}: upstreamNameservers: at most 3 servers (kube-dns)")
    return KubeDnsConfig(tuple(zones), upstream)


def forwarding(
    settings: UpstreamSettings, config: KubeDnsConfig | None
) -> tuple[tuple[tuple[str, tuple[Endpoint, ...]], ...], tuple[Endpoint, ...]]:
    """(per-zone servers, default servers) from the flags and the ConfigMap: a zone given
    with ``--forward`` wins over the same stub domain, and ``--upstream`` over
    ``upstreamNameservers``."""
    if config is None:
        return settings.zones, settings.servers
    flagged = {zone for zone, _ in settings.zones}
    zones = settings.zones + tuple((z, s) for z, s in config.zones if z not in flagged)
    return zones, settings.servers or config.servers


@dataclass(frozen=True)
class DatapathSettings:
    """How the programs are built and attached."""

    pin_dir: Path = DEFAULT_PIN_DIR
    """Where maps are pinned; a restarted agent and the inspection CLI find them here."""
    tc_prio: int = 1
    """tc filter priority of our programs (lower runs first)."""
    tc_handle: int = 0x1D5
    """tc filter handle; with the prio it identifies our filters and only ours."""
    enable_tcp: bool = True
    enable_ipv6: bool = True
    heartbeat_timeout: float = 1.0
    """Seconds without a heartbeat after which programs fail open."""
    socket_lookup: bool = True
    """Also fail open at once when no resolver socket exists (agent killed)."""
    flow_rate: int = 2000
    """New DNS flows per second one pod may open before the excess passes untouched."""
    flow_burst: int = 4000
    query_rate: int = 1000
    """Queries per second one pod may send the resolver (UDP queries and TCP connections,
    captured or to the resolver's own address); the excess is dropped in the kernel.  Hot
    cluster names are answered in the kernel and do not count.  A busy service sends the
    resolver tens to hundreds a second; 1000 is beyond that, and about a fifth of what the
    resolver's careful path serves on one core when every query is a cache miss (5,500 a
    second on the benchmark machine), so a flooding pod leaves the others most of it
    (docs/benchmarks.md, fairness)."""
    tcp_connections: int = ServerSettings.tcp_client_connections
    """TCP connections one pod may hold to the resolver, enforced at the SYN; the agent sets
    it from ``ServerSettings.tcp_client_connections`` (one number for both checks)."""
    answer_rate: int = 50000
    """Queries per second the kernel answers for one pod before the excess is dropped: the
    fast path is cheap, but a pod flooding it still takes softirq time from its neighbours."""
    fastpath: bool = True
    """Answer hot cluster names in the kernel (bpf/lib/fastpath.h, ENABLE_FASTPATH)."""
    fastpath_entries: int = 65536
    """Capacity of the fast-path answer map (allocated as used, ~420 bytes per entry)."""
    fastpath_cached: int = 8192
    """Hot forwarded names the kernel answers from the resolver's cache, at most (allocated
    as used, ~540 bytes per entry; 0: none)."""
    fastpath_cached_hits: int = 4
    """A cached answer goes down to the kernel once the resolver has served it this often."""
    max_udp: int = DEFAULT_MAX_UDP
    """Our EDNS payload size, as the resolver announces it (the fast path must match)."""
    kernel_headers: str = "auto"
    """Headers bcc compiles against: auto, node, bundled or a directory (kheaders.py)."""

    @property
    def query_burst(self) -> int:
        """A pod may send half a second's worth of queries at once (a start-up's burst of
        lookups).  Not more: a burst lands in the resolver's one socket queue at once, and
        every other pod's next query waits behind it."""
        return max(1, self.query_rate // 2)

    @property
    def answer_burst(self) -> int:
        return 2 * self.answer_rate


@dataclass(frozen=True)
class AgentSettings:
    """What the node agent needs beyond the resolver's settings."""

    node_name: str
    resolver_addresses: tuple[str, ...] = (DEFAULT_RESOLVER_ADDRESS,)
    """Node-local addresses of the resolver (one per family); replies to pods leave here."""
    resolver_device: str = "lo"
    """Device the resolver addresses are put on."""
    captures: tuple[str, ...] = ()
    """DNS server addresses whose traffic is captured (e.g. the kube-dns ClusterIP)."""
    capture_all: bool = False
    """Capture port 53 to any destination."""
    interfaces: str | None = None
    """Glob of host interfaces to attach to, instead of discovering them from pod IPs."""
    resync_interval: float = 2.0
    """Seconds between full reconciliations (netlink events trigger them sooner)."""
    datapath: DatapathSettings = field(default_factory=DatapathSettings)
    state_dir: Path = DEFAULT_STATE_DIR
    """Where the state file (pod names of counter slots, for the inspection CLI) is kept."""
    admin_socket: Path | None = DEFAULT_STATE_DIR / ADMIN_SOCKET
    """Root-only Unix socket for ``interceptor services`` and ``query``; None: none."""
    early_capture: float = 30.0
    """Seconds a veth the kernel routes a pod address to is captured before the API reports
    that pod (a pod being born: its first queries); then the API decides.  0: off."""
    handover_grace: float = 60.0
    """Seconds the kernel keeps answering after a graceful stop with a successor coming
    (lifecycle.py); 0: never hand over."""
    pod_name: str | None = None
    pod_namespace: str | None = None
    """This agent's own pod ($POD_NAME, $POD_NAMESPACE): how it finds its DaemonSet."""

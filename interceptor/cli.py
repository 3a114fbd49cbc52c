"""The ``interceptor`` command.  Parses flags into one Settings object and hands it on; no
business logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from interceptor import __version__
from interceptor.console import verbs
from interceptor.errors import ConfigError, InterceptorError
from interceptor.model.objects import DNS_LABEL, EXPORT_KEYWORDS
from interceptor.settings import (
    ADMIN_SOCKET,
    AGENT_HEALTH,
    AGENT_METRICS,
    AgentSettings,
    AutopathSettings,
    CacheSettings,
    DatapathSettings,
    Endpoint,
    KubeSettings,
    PodRecords,
    ServerSettings,
    Settings,
    UpstreamSettings,
    ZoneSettings,
    load_kube_dns_config,
    resolv_conf_search,
)

EPILOG = (
    """examples:
  interceptor serve --listen 127.0.0.1:5353
  interceptor serve --source cluster.yaml --listen 127.0.0.1:53 --upstream 10.0.0.2:53
  interceptor net show
  interceptor query kubernetes.default.svc.cluster.local --from 10.244.1.10

"""
    + verbs.VERBS_EPILOG
)


AGENT_EPILOG = """examples:
  interceptor agent --node-name node-1 --capture 10.96.0.10
  interceptor agent --source cluster.yaml --node-name node-1 \\
      --resolver-address 169.254.20.10 --capture 10.96.0.10 --upstream 10.96.0.10:53
"""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _forward_zone(text: str) -> tuple[str, tuple[Endpoint, ...]]:
    zone, sep, servers = text.partition("=")
    zone = zone.strip().strip(".").lower()
    if not sep or not zone or not servers:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ZONE=ADDR[:PORT][,ADDR[:PORT]]")
    try:
        return zone, tuple(Endpoint.parse(s) for s in servers.split(","))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_negative_int(text: str) -> int:
    """argparse type: 0 or more (where 0 means something: no cache, unlimited, TTL 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _positive_int(text: str) -> int:
    """argparse type: 1 or more."""
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not allowed here: give 1 or more")
    return value


# Every default below is read from the settings dataclasses (one home per fact), as kopf's
# configuration does: changing a default there changes the flag, its --help and the docs.
ZONE = ZoneSettings()
SERVER = ServerSettings()
UPSTREAM = UpstreamSettings()
CACHE = CacheSettings()
AUTOPATH = AutopathSettings()
DATAPATH = DatapathSettings()
AGENT = AgentSettings(node_name="")
RESOLV_CONF = Settings().resolv_conf


def _add_resolver_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``serve`` and ``agent`` share: the zone, sources, forwarding, the cache."""
    p.add_argument(
        "--metrics-address",
        type=_endpoint,
        metavar="ADDR:PORT",
        help=f"serve Prometheus metrics here (the agent's default: {AGENT_METRICS})",
    )
    p.add_argument(
        "--health-address",
        type=_endpoint,
        metavar="ADDR:PORT",
        help=f"serve /healthz and /readyz here (the agent's default: {AGENT_HEALTH})",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="watch the Kubernetes API with this kubeconfig (the agent's default is in-cluster "
        "config; serve's is --source)",
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="FILE",
        help="YAML file of Kubernetes objects (default: the bundled example cluster)",
    )
    p.add_argument(
        "--cluster-domain",
        default=ZONE.cluster_domain,
        metavar="D",
        help="the cluster domain (default: %(default)s)",
    )
    p.add_argument(
        "--ttl",
        type=_non_negative_int,
        default=ZONE.ttl,
        metavar="N",
        help="TTL of authoritative answers in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--pod-records",
        choices=[m.value for m in PodRecords],
        default=ZONE.pod_records.value,
        help="answering of a-b-c-d.<ns>.pod.<zone> names (default: %(default)s)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="allocate IPv6 mesh VIPs from 2001:2::/48 (default: AAAA is NODATA)",
    )
    p.add_argument(
        "--default-service-export-to",
        default=",".join(ZONE.default_export_to),
        metavar="LIST",
        help="exportTo of ServiceEntries that set none, as meshConfig's "
        "defaultServiceExportTo: '*' (everyone), '.' (their own namespace), '~' (no one) "
        "or namespace names, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--upstream",
        type=_endpoint,
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="forward other names here (repeatable; default: /etc/resolv.conf)",
    )
    p.add_argument(
        "--forward",
        type=_forward_zone,
        action="append",
        default=[],
        metavar="ZONE=ADDR[:PORT],...",
        help="send names under ZONE to these servers (repeatable; like stubDomains)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=UPSTREAM.timeout,
        metavar="SECONDS",
        help="timeout of one upstream attempt (default: %(default)s)",
    )
    p.add_argument(
        "--allow-forward",
        action="append",
        default=[],
        metavar="IP",
        help="a server a pod's query may also be forwarded to (repeatable); the captured "
        "addresses, the upstreams and the kube-dns ConfigMap's servers always are, and any "
        "other a pod addresses (--capture-all) gets REFUSED",
    )
    p.add_argument(
        "--force-tcp",
        action="store_true",
        help="ask upstreams over TCP only, on persistent pipelined connections",
    )
    p.add_argument(
        "--kube-dns-config",
        type=Path,
        metavar="PATH",
        help="kube-dns ConfigMap (YAML file or mounted directory): its stubDomains and "
        "upstreamNameservers are followed, re-read on change",
    )
    p.add_argument(
        "--autopath",
        action=argparse.BooleanOptionalAction,
        default=AUTOPATH.enabled,
        help="complete a known pod's search path on the server: one round trip instead of "
        "up to five (default: on)",
    )
    p.add_argument(
        "--resolv-conf",
        type=Path,
        default=RESOLV_CONF,
        metavar="PATH",
        help="the node's resolv.conf: serve's default upstreams and the node search domains "
        "pods inherit (default: %(default)s)",
    )
    p.add_argument(
        "--cache-size",
        type=_non_negative_int,
        default=CACHE.size,
        metavar="N",
        help="forwarded answers cached (0: no cache; default: %(default)s)",
    )
    p.add_argument(
        "--cache-min-ttl",
        type=_non_negative_int,
        default=CACHE.min_ttl,
        metavar="S",
        help="cache answers at least S seconds (default: %(default)s)",
    )
    p.add_argument(
        "--cache-max-ttl",
        type=_non_negative_int,
        default=CACHE.max_ttl,
        metavar="S",
        help="cache answers at most S seconds (default: %(default)s)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=CACHE.stale_after,
        metavar="SECONDS",
        help="a name whose cached answer expired gets it (TTL 30) if the upstream has not "
        "answered within this long, while the refresh goes on (RFC 8767's client response "
        "timer; default: %(default)s)",
    )
    p.add_argument(
        "--max-udp-size",
        type=_non_negative_int,
        default=SERVER.max_udp_size,
        metavar="BYTES",
        help="cap on EDNS UDP response size (default: %(default)s)",
    )


def _add_tcp_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tcp-idle-timeout",
        type=float,
        default=SERVER.tcp_idle_timeout,
        metavar="SECONDS",
        help="close idle TCP connections after this long (default: %(default)s)",
    )
    p.add_argument(
        "--tcp-max-connections",
        type=_positive_int,
        default=SERVER.tcp_max_connections,
        metavar="N",
        help="concurrent TCP connections (default: %(default)s)",
    )
    p.add_argument(
        "--tcp-client-connections",
        type=_positive_int,
        default=SERVER.tcp_client_connections,
        metavar="N",
        help="concurrent TCP connections one client may hold; the agent also enforces it "
        "per pod in the kernel, at the SYN (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interceptor",
        description="Transparent DNS for Kubernetes nodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    verbs.add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="answer DNS on an address, from a YAML service source",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_resolver_flags(serve)
    _add_tcp_flags(serve)
    serve.add_argument(
        "--listen",
        type=_endpoint,
        default=SERVER.listen,
        metavar="ADDR:PORT",
        help="UDP and TCP listen address (default: %(default)s)",
    )
    serve.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="serve `interceptor services`/`query` on this root-only Unix socket (default: off)",
    )

    agent = sub.add_parser(
        "agent",
        help="node agent: BPF capture of pod DNS on their veths, resolver on a node address",
        epilog=AGENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_resolver_flags(agent)
    _add_tcp_flags(agent)
    agent.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        help="this node's name (default: $NODE_NAME)",
    )
    agent.add_argument(
        "--resolver-address",
        action="append",
        default=[],
        metavar="IP",
        help="node-local resolver address, one per family (default: "
        + ", ".join(AGENT.resolver_addresses)
        + ")",
    )
    agent.add_argument(
        "--resolver-device",
        default=AGENT.resolver_device,
        metavar="DEV",
        help="device that carries the resolver address (default: %(default)s)",
    )
    agent.add_argument(
        "--capture",
        action="append",
        default=[],
        metavar="IP",
        help="DNS server address whose traffic is captured (repeatable)",
    )
    agent.add_argument(
        "--capture-all", action="store_true", help="capture port-53 traffic to any destination"
    )
    agent.add_argument(
        "--interfaces", metavar="GLOB", help="attach only to host interfaces matching GLOB"
    )
    agent.add_argument(
        "--pin-path",
        type=Path,
        default=DATAPATH.pin_dir,
        help="where BPF maps are pinned (default: %(default)s)",
    )
    agent.add_argument(
        "--tc-prio",
        type=_positive_int,
        default=DATAPATH.tc_prio,
        help="tc filter priority (default: %(default)s)",
    )
    agent.add_argument(
        "--tc-handle",
        type=lambda t: int(t, 0),
        default=DATAPATH.tc_handle,
        help=f"tc filter handle (default: {DATAPATH.tc_handle:#x})",
    )
    agent.add_argument(
        "--flow-rate",
        type=_non_negative_int,
        default=DATAPATH.flow_rate,
        metavar="N",
        help="new DNS flows per second per pod before the excess bypasses "
        "the resolver (0: unlimited; default: %(default)s)",
    )
    agent.add_argument(
        "--query-rate",
        type=_non_negative_int,
        default=DATAPATH.query_rate,
        metavar="N",
        help="queries per second per pod to the resolver before the excess is dropped in the "
        "kernel; the burst is half the rate (0: unlimited; default: %(default)s)",
    )
    agent.add_argument(
        "--answer-rate",
        type=_non_negative_int,
        default=DATAPATH.answer_rate,
        metavar="N",
        help="queries per second per pod the kernel answers before the excess is dropped; "
        "the burst is twice the rate (0: unlimited; default: %(default)s)",
    )
    agent.add_argument("--no-ipv6", action="store_true", help="build the datapath without IPv6")
    agent.add_argument(
        "--no-fastpath",
        action="store_true",
        help="do not answer cluster names in the kernel (every query goes to the resolver)",
    )
    agent.add_argument(
        "--fastpath-entries",
        type=_positive_int,
        default=DATAPATH.fastpath_entries,
        metavar="N",
        help="capacity of the in-kernel answer map (default: %(default)s)",
    )
    agent.add_argument(
        "--fastpath-cached",
        type=_non_negative_int,
        default=DATAPATH.fastpath_cached,
        metavar="N",
        help="hot forwarded names answered in the kernel from the cache, at most "
        "(0: none; default: %(default)s)",
    )
    agent.add_argument(
        "--fastpath-cached-hits",
        type=_positive_int,
        default=DATAPATH.fastpath_cached_hits,
        metavar="N",
        help="a cached answer goes down to the kernel once the resolver has served it N "
        "times (default: %(default)s)",
    )
    agent.add_argument(
        "--state-dir",
        type=Path,
        default=AGENT.state_dir,
        metavar="DIR",
        help="state file for the inspection verbs (pod names) (default: %(default)s)",
    )
    agent.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="root-only Unix socket for `interceptor services`/`query` "
        "(default: <state-dir>/admin.sock; 'none': off)",
    )
    agent.add_argument(
        "--kernel-headers",
        default=DATAPATH.kernel_headers,
        metavar="auto|node|bundled|DIR",
        help="headers bcc compiles the programs against: the node's /lib/modules, the "
        "image's ($INTERCEPTOR_KERNEL_HEADERS), or a directory; auto prefers the node's "
        "(default: %(default)s)",
    )
    agent.add_argument(
        "--early-capture",
        type=float,
        default=AGENT.early_capture,
        metavar="SECONDS",
        help="capture a new pod's veth as soon as the kernel routes its address, for up to "
        "this long before the API reports the pod (0: only pods the API reported; "
        "default: %(default)s)",
    )
    agent.add_argument(
        "--handover-grace",
        type=float,
        default=AGENT.handover_grace,
        metavar="SECONDS",
        help="after a graceful stop while the agent's DaemonSet remains (a rollout), the "
        "kernel keeps answering its answer map this long (0: off; default: %(default)s)",
    )
    agent.add_argument("--dump-bpf", action="store_true", help=argparse.SUPPRESS)

    verbs.add_parsers(sub)
    return parser


def _export_to(value: str) -> tuple[str, ...]:
    items = tuple(sorted({v.strip().lower() for v in value.split(",") if v.strip()}))
    for v in items:
        if v not in EXPORT_KEYWORDS and not DNS_LABEL.fullmatch(v):
            raise ConfigError(
                f"--default-service-export-to: {v!r} is not '*', '.', '~' or a namespace name"
            )
    if not items:
        raise ConfigError("--default-service-export-to must name someone ('~' for no one)")
    return items


def settings_from(args: argparse.Namespace) -> Settings:
    if args.ttl > 0x7FFFFFFF:
        raise ConfigError("--ttl must fit in 31 bits (RFC 2181 section 8)")
    if not 0 < args.stale_after <= 30:
        raise ConfigError("--stale-after must be more than 0 and at most 30 seconds")
    if not 512 <= args.max_udp_size <= 65535:
        raise ConfigError("--max-udp-size must be between 512 and 65535")
    return Settings(
        zone=ZoneSettings(
            cluster_domain=args.cluster_domain.strip(".").lower(),
            ttl=args.ttl,
            pod_records=PodRecords(args.pod_records),
            ipv6=args.ipv6,
            default_export_to=_export_to(args.default_service_export_to),
        ),
        server=ServerSettings(
            listen=getattr(args, "listen", ServerSettings().listen),
            max_udp_size=args.max_udp_size,
            tcp_idle_timeout=args.tcp_idle_timeout,
            tcp_max_connections=args.tcp_max_connections,
            tcp_client_connections=args.tcp_client_connections,
        ),
        upstream=UpstreamSettings(
            servers=tuple(args.upstream),
            timeout=args.upstream_timeout,
            zones=tuple(args.forward),
            force_tcp=args.force_tcp,
            allow=tuple(Endpoint.parse(ip).host for ip in args.allow_forward),
            kube_dns_config=args.kube_dns_config,
            kube_dns=load_kube_dns_config(args.kube_dns_config) if args.kube_dns_config else None,
        ),
        autopath=AutopathSettings(
            enabled=args.autopath, node_search=resolv_conf_search(args.resolv_conf)
        ),
        resolv_conf=args.resolv_conf,
        source=args.source,
        kube=_kube_settings(args),
        cache=CacheSettings(
            size=args.cache_size,
            min_ttl=args.cache_min_ttl,
            max_ttl=args.cache_max_ttl,
            stale_after=args.stale_after,
        ),
        health=args.health_address or (AGENT_HEALTH if args.command == "agent" else None),
        metrics=args.metrics_address or (AGENT_METRICS if args.command == "agent" else None),
    )


def _kube_settings(args: argparse.Namespace) -> KubeSettings | None:
    if args.source is not None and args.kubeconfig is not None:
        raise ConfigError("give --source (a YAML file) or --kubeconfig (the API), not both")
    node = getattr(args, "node_name", None)
    if args.kubeconfig is not None:
        return KubeSettings(kubeconfig=args.kubeconfig, node_name=node)
    if args.command == "agent" and args.source is None:
        return KubeSettings(kubeconfig=None, node_name=node)  # in-cluster: the DaemonSet
    return None


def agent_settings_from(args: argparse.Namespace) -> AgentSettings:

    if not args.node_name:
        raise ConfigError("--node-name (or NODE_NAME) is required")
    if not args.capture and not args.capture_all:
        raise ConfigError(
            "nothing to capture: give --capture IP (the kube-dns ClusterIP) or --capture-all"
        )
    resolvers = tuple(args.resolver_address) or AGENT.resolver_addresses
    if len({Endpoint.parse(ip).family_v6 for ip in resolvers}) != len(resolvers):
        raise ConfigError("give at most one --resolver-address per address family")
    admin = args.admin_socket or args.state_dir / ADMIN_SOCKET
    if not 0 <= args.handover_grace <= 600:
        raise ConfigError("--handover-grace must be between 0 and 600 seconds")
    if not 0 <= args.early_capture <= 600:
        raise ConfigError("--early-capture must be between 0 and 600 seconds")
    return AgentSettings(
        early_capture=args.early_capture,
        handover_grace=args.handover_grace,
        pod_name=os.environ.get("POD_NAME") or None,
        pod_namespace=os.environ.get("POD_NAMESPACE") or None,
        state_dir=args.state_dir,
        admin_socket=None if str(admin) == "none" else admin,
        node_name=args.node_name,
        resolver_addresses=resolvers,
        resolver_device=args.resolver_device,
        captures=tuple(Endpoint.parse(ip).host for ip in args.capture),
        capture_all=args.capture_all,
        interfaces=args.interfaces,
        datapath=DatapathSettings(
            pin_dir=args.pin_path,
            tc_prio=args.tc_prio,
            tc_handle=args.tc_handle,
            enable_ipv6=not args.no_ipv6,
            flow_rate=args.flow_rate,
            query_rate=args.query_rate,
            answer_rate=args.answer_rate,
            tcp_connections=args.tcp_client_connections,
            fastpath=not args.no_fastpath,
            fastpath_entries=args.fastpath_entries,
            fastpath_cached=args.fastpath_cached,
            fastpath_cached_hits=args.fastpath_cached_hits,
            max_udp=args.max_udp_size,
            kernel_headers=args.kernel_headers,
        ),
    )


def _run_agent(args: argparse.Namespace) -> int:
    from interceptor.datapath.build import bpf_source_dir, cflags
    from interceptor.datapath.loader import Datapath
    from interceptor.node.agent import Agent

    agent_settings = agent_settings_from(args)
    if args.dump_bpf:
        print("// cflags:", " ".join(cflags(Datapath(agent_settings.datapath).build_spec())))
        print((bpf_source_dir() / "redirect.c").read_text())
        if agent_settings.datapath.fastpath:
            print((bpf_source_dir() / "lib" / "fastpath.h").read_text())
        return 0
    asyncio.run(Agent(settings_from(args), agent_settings).run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    log = logging.getLogger("interceptor")
    if args.command in ("serve", "agent"):
        # `kill -USR1 PID` prints every thread's stack: the way to see where a stuck
        # resolver or a stop that outlives kubelet's grace period is waiting.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if args.command == "serve":
            from interceptor.node.runtime import serve

            asyncio.run(serve(settings_from(args), admin_socket=args.admin_socket))
            return 0
        if args.command == "agent":
            return _run_agent(args)
        if args.command in verbs.COMMANDS:
            return verbs.run(args, parser)
        parser.print_help()
        return 2
    except InterceptorError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130

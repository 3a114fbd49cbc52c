"""The ``interceptor`` command.  Parses flags into one Settings object and hands it on; no
business logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from interceptor import __version__
from interceptor.errors import ConfigError, InterceptorError
from interceptor.settings import (
    Endpoint,
    PodRecords,
    ServerSettings,
    Settings,
    UpstreamSettings,
    ZoneSettings,
)

EPILOG = """examples:
  interceptor serve --listen 127.0.0.1:5353
  interceptor serve --source cluster.yaml --listen 127.0.0.1:53 --upstream 10.0.0.2:53
  interceptor demo
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _add_zone_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        type=Path,
        metavar="FILE",
        help="YAML file of Kubernetes objects (default: the bundled example cluster)",
    )
    p.add_argument(
        "--cluster-domain",
        default="cluster.local",
        metavar="D",
        help="the cluster domain (default: %(default)s)",
    )
    p.add_argument(
        "--ttl",
        type=_positive_int,
        default=30,
        metavar="N",
        help="TTL of authoritative answers in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--pod-records",
        choices=[m.value for m in PodRecords],
        default="insecure",
        help="answering of a-b-c-d.<ns>.pod.<zone> names (default: %(default)s)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="allocate IPv6 mesh VIPs from 2001:2::/48 (default: AAAA is NODATA)",
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
        "--upstream-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="timeout of one upstream attempt (default: %(default)s)",
    )
    p.add_argument(
        "--max-udp-size",
        type=_positive_int,
        default=1232,
        metavar="BYTES",
        help="cap on EDNS UDP response size (default: %(default)s)",
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="answer DNS on an address, from a YAML service source",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_zone_flags(serve)
    serve.add_argument(
        "--listen",
        type=_endpoint,
        default=Endpoint("127.0.0.1", 53),
        metavar="ADDR:PORT",
        help="UDP and TCP listen address (default: %(default)s)",
    )

    serve.add_argument(
        "--tcp-idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close idle TCP connections after this long (default: %(default)s)",
    )
    serve.add_argument(
        "--tcp-max-connections",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="concurrent TCP connections (default: %(default)s)",
    )

    sub.add_parser("demo", help="run the guided demo (root: builds network namespaces)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    if args.ttl > 0x7FFFFFFF:
        raise ConfigError("--ttl must fit in 31 bits (RFC 2181 section 8)")
    if not 512 <= args.max_udp_size <= 65535:
        raise ConfigError("--max-udp-size must be between 512 and 65535")
    return Settings(
        zone=ZoneSettings(
            cluster_domain=args.cluster_domain.strip(".").lower(),
            ttl=args.ttl,
            pod_records=PodRecords(args.pod_records),
            ipv6=args.ipv6,
        ),
        server=ServerSettings(
            listen=args.listen,
            max_udp_size=args.max_udp_size,
            tcp_idle_timeout=args.tcp_idle_timeout,
            tcp_max_connections=args.tcp_max_connections,
        ),
        upstream=UpstreamSettings(servers=tuple(args.upstream), timeout=args.upstream_timeout),
        source=args.source,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    log = logging.getLogger("interceptor")
    try:
        if args.command == "serve":
            from interceptor.app import serve

            asyncio.run(serve(settings_from(args)))
            return 0
        if args.command == "demo":
            from interceptor.demo import run_demo

            return int(run_demo())
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

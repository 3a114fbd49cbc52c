"""``interceptor net|prog|map|stats|services|query|top``: bpftool-style inspection.

Text by default (tables under 80 columns, upper-case headers, sorted rows); ``-j/--json`` for
JSON, ``-p/--pretty`` for indented JSON (it implies ``-j``), accepted before or after the
verb.  ``net``, ``prog``, ``map``, ``stats`` and ``top`` read the kernel and the pinned maps
directly and work while the agent is down; ``services`` and ``query`` ask the running agent
over its admin socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from interceptor.console.table import fields, render
from interceptor.errors import InterceptorError
from interceptor.ops.state import NodeState, read_state
from interceptor.settings import ADMIN_SOCKET, DEFAULT_PIN_DIR, DEFAULT_STATE_DIR

DEFAULT_PIN_PATH = DEFAULT_PIN_DIR
COMMANDS = ("net", "prog", "map", "stats", "services", "query", "top")

EXAMPLES = {
    "net": """examples:
  interceptor net show
  interceptor net show dev veth1a2b3c
  interceptor -j net show | jq '.interfaces[] | select(.programs_missing)'
""",
    "prog": """examples:
  interceptor prog show
  sysctl -w kernel.bpf_stats_enabled=1; interceptor prog show   # with run counts
  interceptor -p prog show
""",
    "map": """examples:
  interceptor map show
  interceptor map dump FLOWS
  interceptor map dump CONFIG          # heartbeat age: is the agent beating?
  interceptor -j map dump POD_STATS
""",
    "stats": """examples:
  interceptor stats
  interceptor stats --state-dir /run/dns-interceptor -j
""",
    "services": """examples:
  interceptor services
  interceptor services kube-dns
  interceptor services default/kubernetes
""",
    "query": """examples:
  interceptor query kubernetes.default.svc.cluster.local
  interceptor query example.com.default.svc.cluster.local AAAA
  interceptor query web --from 10.244.1.10      # as that pod's query would be answered
""",
    "top": """examples:
  interceptor top
  interceptor top --interval 5
  interceptor top --once                        # one frame, for scripts
""",
}

VERBS_EPILOG = """inspection (works while the agent is down, except services and query):
  interceptor net show [dev IFACE]     veths with our programs, their pods, foreign programs
  interceptor prog show                our loaded programs and their maps
  interceptor map show                 pinned maps
  interceptor map dump NAME            a map's decoded contents
  interceptor stats                    per-pod and per-reason counters
  interceptor top                      live per-pod query rates
  interceptor services [NAME]          services the running agent answers for
  interceptor query NAME [TYPE]        the running agent's answer, and why
"""


def _common() -> argparse.ArgumentParser:
    """Flags every verb takes, also after the verb (their defaults live on the top parser,
    so SUPPRESS here keeps a flag given before the verb)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-j", "--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    p.add_argument(
        "-p",
        "--pretty",
        action="store_true",
        default=argparse.SUPPRESS,
        help="indented JSON (implies -j)",
    )
    p.add_argument(
        "--pin-path",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"pinned maps (default: the agent's, from its state file, else {DEFAULT_PIN_PATH})",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"the agent's state directory (default: {DEFAULT_STATE_DIR})",
    )
    return p


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--json", action="store_true", help="JSON output (inspection verbs)")
    parser.add_argument(
        "-p", "--pretty", action="store_true", help="indented JSON output (implies -j)"
    )


def add_parsers(sub: Any) -> None:
    """The inspection verbs, on the ``interceptor`` command's subparsers."""
    common = _common()

    def verb(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(  # type: ignore[no-any-return]
            name,
            help=help,
            parents=[common],
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    net = verb("net", "show which veths carry our programs (reads the kernel)")
    net_sub = net.add_subparsers(dest="action", metavar="COMMAND")
    show = net_sub.add_parser(
        "show",
        help="veths, hooks, programs, pods",
        parents=[common],
        epilog=EXAMPLES["net"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("dev", nargs="*", metavar="dev IFACE", help="only this interface")

    prog = verb("prog", "show our loaded BPF programs")
    prog_sub = prog.add_subparsers(dest="action", metavar="COMMAND")
    prog_sub.add_parser(
        "show",
        help="id, tag, load time, run counts, maps",
        parents=[common],
        epilog=EXAMPLES["prog"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    mp = verb("map", "show or dump our pinned BPF maps")
    map_sub = mp.add_subparsers(dest="action", metavar="COMMAND")
    map_sub.add_parser(
        "show",
        help="pinned maps and their metadata",
        parents=[common],
        epilog=EXAMPLES["map"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dump = map_sub.add_parser(
        "dump",
        help="a map's decoded contents",
        parents=[common],
        epilog=EXAMPLES["map"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dump.add_argument(
        "name", nargs="+", metavar="NAME", help="map name, e.g. FLOWS (or bpftool's: name FLOWS)"
    )

    verb("stats", "per-pod query and redirect counts, packets by reason")

    services = verb("services", "services the running agent answers for (admin socket)")
    services.add_argument("name", nargs="?", help="service name, NAMESPACE/NAME or DNS name")
    services.add_argument("--admin-socket", type=Path, metavar="PATH", help=_ADMIN_HELP)

    query = verb("query", "what the running agent answers for a name, and why (admin socket)")
    query.add_argument("name", help="the name to ask")
    query.add_argument("type", nargs="?", default="A", help="query type (default: A)")
    query.add_argument(
        "--from", dest="source", metavar="POD_IP", help="answer as for a query from this pod"
    )
    query.add_argument("--admin-socket", type=Path, metavar="PATH", help=_ADMIN_HELP)

    top = verb("top", "live per-pod query rates (q or Ctrl-C to quit)")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="refresh period (default: 1)"
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--count", type=int, metavar="N", help="print N frames and exit")


_ADMIN_HELP = "the agent's admin socket (default: <state-dir>/" + ADMIN_SOCKET + ")"


# ----------------------------------------------------------------------------- running


class UsageError(InterceptorError):
    """invalid arguments."""


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pretty = bool(getattr(args, "pretty", False))
        self.json = self.pretty or bool(getattr(args, "json", False))
        self.state_dir: Path = getattr(args, "state_dir", None) or DEFAULT_STATE_DIR
        self.notes: list[str] = []
        try:
            self.state: NodeState | None = read_state(self.state_dir)
        except InterceptorError as exc:
            self.state = None
            self.notes.append(f"warning: {exc}; pods are shown by address")
        pin = getattr(args, "pin_path", None)
        if pin is None and self.state is not None:
            pin = Path(self.state.agent.pin_path)
        self.pin_path: Path = pin or DEFAULT_PIN_PATH

    def admin_socket(self) -> Path:
        given = getattr(self.args, "admin_socket", None)
        if given is not None:
            return Path(given)
        if self.state is not None and self.state.agent.admin_socket:
            return Path(self.state.agent.admin_socket)
        return self.state_dir / ADMIN_SOCKET

    def emit(self, data: Any, text: str) -> None:
        if self.json:
            print(json.dumps(data, indent=2 if self.pretty else None, sort_keys=False))
        else:
            for note in self.notes:
                print(note, file=sys.stderr)
            print(text)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run one inspection verb.  Errors are one line on stderr, never a traceback."""
    try:
        ctx = Ctx(args)
        cmd = args.command
        if cmd in ("net", "prog", "map") and not getattr(args, "action", None):
            parser.parse_args([cmd, "--help"])
        if cmd == "net":
            net_show(ctx)
        elif cmd == "prog":
            prog_show(ctx)
        elif cmd == "map" and args.action == "show":
            map_show(ctx)
        elif cmd == "map":
            map_dump(ctx)
        elif cmd == "stats":
            stats(ctx)
        elif cmd == "services":
            services(ctx)
        elif cmd == "query":
            query(ctx)
        elif cmd == "top":
            from interceptor.console.top import run_top

            return run_top(ctx.pin_path, ctx.state_dir, args.interval, args.once, args.count)
        return 0
    except InterceptorError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


# ----------------------------------------------------------------------------- net


def net_show(ctx: Ctx) -> None:
    from interceptor.ops.views import net_show as view

    dev = ctx.args.dev
    if dev and (len(dev) != 2 or dev[0] != "dev"):
        raise UsageError("expected: net show [dev IFACE]")
    data = view(ctx.pin_path, ctx.state, dev[1] if dev else None)
    rows = []
    for link in data["interfaces"]:
        pods = ",".join(link["pods"]) or "-"
        for h in link["hooks"]:
            rows.append(
                (
                    link["ifname"],
                    h["direction"],
                    h["attach"],
                    h["prio"],
                    f"{h['handle']:#x}" if h["handle"] is not None else None,
                    h["prog_id"],
                    h["name"] or h["kind"],
                    "ours" if h["ours"] else "FOREIGN",
                    pods,
                )
            )
        if link["programs_missing"]:
            rows.append((link["ifname"], "-", "-", None, None, None, "(missing)", "ours", pods))
    headers = ["iface", "hook", "via", "prio", "handle", "id", "program", "owner", "pod"]
    lines = [render(headers, rows)] if rows else ["no programs on any tc hook here"]
    foreign = [r for r in rows if r[7] == "FOREIGN"]
    if foreign:
        lines.append(
            "\nFOREIGN: another program shares the hook; tcx programs and tc filters\n"
            "with a lower prio run before ours."
        )
    ctx.emit(data, "\n".join(lines))


# ----------------------------------------------------------------------------- prog


def prog_show(ctx: Ctx) -> None:
    from interceptor.ops.views import prog_show as view

    data = view(ctx.pin_path)
    rows = [
        (
            p["id"],
            p["name"],
            p["tag"],
            p["loaded_at"][:19].replace("T", " "),
            p["run_cnt"],
            p["avg_ns"],
            len(p["attached"]),
        )
        for p in data["programs"]
    ]
    out = [render(["id", "name", "tag", "loaded", "runs", "avg ns", "hooks"], rows)]
    if not rows:
        out = [f"no programs use the maps in {data['pin_path']}"]
    for p in sorted(data["programs"], key=lambda p: p["id"]):
        maps = " ".join(f"{m['name'] or '?'}({m['id']})" for m in p["maps"])
        out.append(textwrap.fill(f"{p['id']} maps: {maps}", 80, subsequent_indent="  "))
    enabled = data["stats_enabled"]
    if enabled is False:
        out.append(
            "run counts: off (kernel.bpf_stats_enabled=0); to count:\n"
            "  sysctl -w kernel.bpf_stats_enabled=1"
        )
    elif enabled is None:
        out.append("run counts: unknown (cannot read kernel.bpf_stats_enabled)")
    ctx.emit(data, "\n".join(out))


# ----------------------------------------------------------------------------- map


def map_show(ctx: Ctx) -> None:
    from interceptor.ops.views import map_show as view

    data = view(ctx.pin_path)
    rows = [
        (
            m["id"],
            m["name"],
            m["type"],
            m["key_size"],
            m["value_size"],
            m["max_entries"],
            m["entries"],
            ",".join(map(str, m["prog_ids"])) or "-",
        )
        for m in data["maps"]
    ]
    headers = ["id", "name", "type", "key", "value", "max", "entries", "progs"]
    ctx.emit(data, f"pinned in {data['pin_path']}\n" + render(headers, rows))


def map_dump(ctx: Ctx) -> None:
    from interceptor.ops.views import map_dump as view

    words = ctx.args.name
    if len(words) == 2 and words[0] == "name":
        words = words[1:]
    if len(words) != 1:
        raise UsageError("expected: map dump [name] NAME")
    data = view(ctx.pin_path, words[0], ctx.state)
    entries = data["entries"]
    rows: list[tuple[Any, ...]]
    if not data["decoded"]:
        rows = [
            (e["key"]["hex"], e.get("value", {}).get("hex") or f"({len(e['per_cpu'])} CPUs)")
            for e in entries
        ]
        text = render(["key", "value"], rows)
    elif len(entries) == 1 and data["name"] == "CONFIG":
        e = entries[0]
        text = fields([*e["key"].items(), *e["value"].items()])
    else:
        cols = data["columns"]
        rows = [tuple(({**e["key"], **e["value"]}).get(c) for c in cols) for e in entries]
        text = render([c.replace("_", " ") for c in cols], rows)
    text += f"\n{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {data['name']}"
    ctx.emit(data, text)


# ----------------------------------------------------------------------------- stats


EXCEPTIONAL = ("direct", "limited")
"""Per-pod counters shown in ``stats`` text only when not all zero."""


def stats(ctx: Ctx) -> None:
    from interceptor.ops.views import stats as view

    data = view(ctx.pin_path, ctx.state)
    # Columns of what is exceptional show only when some pod has it: the table stays within
    # 80 columns, and a limited pod stands out (the JSON always has every column).
    counts = [
        c
        for c in data["pod_counters"]
        if c not in EXCEPTIONAL or any(p.get(c) for p in data["pods"])
    ]
    rows = [
        (p["pod"], ",".join(p["ifnames"]), *(p.get(c, 0) for c in counts)) for p in data["pods"]
    ]
    agent = "running" if data["agent_running"] else "not running"
    out = [
        f"agent {agent}; {data['interfaces']} interface(s) under management",
        "",
        render(["pod", "iface", *counts], rows) if rows else "no pods",
    ]
    for cs in data["counters"]:
        label = cs["label"]
        crow = [(c[label], c["count"], c["verdict"] or "-") for c in cs["counts"]]
        out += ["", render([label, "packets", "verdict"], crow)]
    ctx.emit(data, "\n".join(out))


# ----------------------------------------------------------------------------- admin verbs


def services(ctx: Ctx) -> None:
    from interceptor.ops.admin import request

    data = request(ctx.admin_socket(), {"op": "services", "name": ctx.args.name})
    if ctx.args.name and not data:
        raise InterceptorError(f"no service or mesh host matches {ctx.args.name!r}")
    rows = [
        (
            s["namespace"],
            s["name"] if s["kind"] == "Service" else s["dns_name"],
            s["type"],
            s["addresses"] if s["type"] != "ExternalName" else s["external_name"],
            s["ports"],
        )
        for s in data
    ]
    ctx.emit(data, render(["namespace", "name", "type", "addresses", "ports"], rows))


def query(ctx: Ctx) -> None:
    from interceptor.ops.admin import request

    a = ctx.args
    data = request(
        ctx.admin_socket(), {"op": "query", "name": a.name, "type": a.type, "from": a.source}
    )
    q, ans, why = data["question"], data["answer"], data["explanation"]
    head = f";; {q['name']} {q['type']}"
    if q["from"]:
        head += f" from {q['from']}"
    out = [f"{head}: {ans['rcode']} ({' '.join(ans['flags'])}) in {data['elapsed_ms']} ms"]
    for section in ("answer", "authority", "additional"):
        for r in ans[section]:
            out.append(f"{r['name']}.\t{r['ttl']}\tIN\t{r['type']}\t{r['data']}")
    out.append("")
    out.append(
        textwrap.fill(f"rule:    {why['rule']}: {why['detail']}", 80, subsequent_indent=" " * 9)
    )
    if why["objects"]:
        out.append(
            textwrap.fill("objects: " + ", ".join(why["objects"]), 80, subsequent_indent=" " * 9)
        )
    if why["upstreams"]:
        out.append("servers: " + ", ".join(why["upstreams"]))
    for i, line in enumerate(why.get("visibility") or []):
        head = "visible: " if i == 0 else " " * 9
        out.append(textwrap.fill(head + line, 80, subsequent_indent=" " * 11))
    ctx.emit(data, "\n".join(out))

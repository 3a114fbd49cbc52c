"""Compiles bpf/redirect.c with bcc, pins its maps, attaches it to host veths, beats the
heartbeat, and answers "which server did this pod ask?" from the flow map."""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcc.libbcc import lib

from interceptor.datapath import kheaders, maps, tc
from interceptor.datapath.bpfsys import (
    BpfError,
    PinnedMap,
    copy_entries,
    ensure_bpffs,
    pin_replacing,
    pinned_map_shape,
)
from interceptor.datapath.tcx import tcx_programs
from interceptor.errors import InterceptorError
from interceptor.settings import DatapathSettings

log = logging.getLogger(__name__)

PROG_FROM_POD = "dnsi_from_pod"
PROG_TO_POD = "dnsi_to_pod"


def bpf_source_dir() -> Path:
    """bpf/ beside the package (a checkout or the image), or INTERCEPTOR_BPF_DIR."""
    env = os.environ.get("INTERCEPTOR_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "bpf"


@dataclass
class PodSlot:
    pod_id: int
    ips: tuple[str, ...]


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    pods: dict[str, int] = field(default_factory=dict)
    """pod IP -> pod id"""


class Datapath:
    def __init__(self, settings: DatapathSettings) -> None:
        self.settings = settings
        self.bpf: Any = None
        self.fds: dict[str, int] = {}
        self.attached: dict[int, Attachment] = {}
        self._pod_ids: dict[str, int] = {}
        self._tcp_excess: dict[int, int] = {}
        """pod id -> how far its kernel TCP count was above the resolver's at the last pass."""
        self._free_ids: list[int] = []
        self._next_id = 0
        self._ipr: Any = None
        self._config = maps.Config()
        """What CONFIG[0] holds; the heartbeat rewrites it with a new timestamp."""
        self._flow_reader: FlowReader | None = None
        self.maps: dict[str, PinnedMap] = {}  # type: ignore[type-arg]

    # ------------------------------------------------------------ loading

    def cflags(self) -> list[str]:
        s = self.settings
        flags = [f"-I{bpf_source_dir()}"]
        if s.enable_tcp:
            flags.append("-DENABLE_TCP")
        if s.enable_ipv6:
            flags.append("-DENABLE_IPV6")
        if s.fastpath:
            flags += ["-DENABLE_FASTPATH", f"-DFP_MAX_ENTRIES={s.fastpath_entries}"]
        return flags

    def load(self) -> None:
        from bcc import BPF  # only here: `serve` must not need bcc at all
        from pyroute2 import IPRoute

        if ensure_bpffs(self.settings.pin_dir.parent):
            log.info("mounted bpffs at %s", self.settings.pin_dir.parent)
        self.settings.pin_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings.fastpath:
            for name, defn in maps.REGISTRY.items():  # a previous run's: not ours to serve now
                if defn.fastpath:
                    (self.settings.pin_dir / name).unlink(missing_ok=True)
        src = bpf_source_dir() / "redirect.c"
        log.info("compiling %s against %s", src, kheaders.apply(self.settings.kernel_headers))
        t0 = time.monotonic()
        try:
            bpf = BPF(src_file=str(src).encode(), cflags=self.cflags())
            progs = {
                n: bpf.load_func(n.encode(), BPF.SCHED_CLS) for n in (PROG_FROM_POD, PROG_TO_POD)
            }
        except Exception as exc:  # bcc raises bare Exception with the compiler's message
            raise InterceptorError(f"cannot build {src}: {exc}") from exc
        self.bpf = bpf
        self.fds = {n: f.fd for n, f in progs.items()}
        carried = self._pin_carrying_state(bpf)
        log.info(
            "BPF programs compiled and loaded in %.2fs (maps pinned in %s; %d entries carried "
            "over from the previous agent's maps)",
            time.monotonic() - t0,
            self.settings.pin_dir,
            carried,
        )
        self.maps = open_maps(self.settings.pin_dir)
        self._ipr = IPRoute()
        self._adopt_pod_ids()

    def _pin_carrying_state(self, bpf: Any) -> int:
        """Pin the maps bcc just created, after copying into them what the previous agent's
        pinned maps hold (flows, pod counters, answers, the handover grace), so a restart
        loses no state and the programs still attached keep working until replaced.

        bcc could pin them itself, but it reopens existing pins by map id, which needs
        CAP_SYS_ADMIN.  A pin with another layout (another version) is replaced without
        copying: that map's state is lost, not the node's DNS."""
        carried = 0
        for name, defn in maps.REGISTRY.items():
            if defn.fastpath and not self.settings.fastpath:
                continue
            fd = bpf[name.encode()].map_fd
            path = self.settings.pin_dir / name
            shape = pinned_map_shape(path)
            entries = defn.entries or self.settings.fastpath_entries
            want = (ct.sizeof(defn.key), ct.sizeof(defn.value), entries)
            if shape == want:
                carried += copy_entries(path, fd, percpu=defn.percpu)
            elif shape is not None:
                log.warning(
                    "pinned map %s has layout %s, this version needs %s: replacing it",
                    path,
                    shape,
                    want,
                )
            pin_replacing(fd, path)
        return carried

    def _adopt_pod_ids(self) -> None:
        """Keep pod ids (and so per-pod counters) across agent restarts."""
        for key, info in self.maps["PODS"].items():
            ip = key.addr.text(key.family)
            self._pod_ids.setdefault(ip, info.pod_id)
        self._next_id = max(self._pod_ids.values(), default=-1) + 1

    # ------------------------------------------------------------ config

    def configure(
        self, resolver_ips: Iterable[str], captures: Iterable[str], capture_all: bool
    ) -> None:
        cfg = maps.Config()
        for ip in resolver_ips:
            if maps.family_of(ip) == maps.FAMILY_V4:
                cfg.resolver4 = maps.IpAddr.of(ip)
            else:
                cfg.resolver6 = maps.IpAddr.of(ip)
        cfg.heartbeat_timeout = int(self.settings.heartbeat_timeout * 1e9)
        cfg.flags = (maps.CFG_CAPTURE_ALL if capture_all else 0) | (
            maps.CFG_SK_LOOKUP if self.settings.socket_lookup else 0
        )
        cfg.flow_rate = self.settings.flow_rate
        cfg.flow_burst = self.settings.flow_burst
        cfg.query_rate = self.settings.query_rate
        cfg.query_burst = self.settings.query_burst
        cfg.answer_rate = self.settings.answer_rate
        cfg.answer_burst = self.settings.answer_burst
        cfg.tcp_conns = self.settings.tcp_connections
        cfg.max_udp = self.settings.max_udp
        # No heartbeat yet: the programs fail open until this agent's first beat (after its
        # first sync and attach), and a predecessor's handover grace stays in force until
        # then, so the kernel keeps answering what the last agent vouched for.
        cfg.heartbeat_ns = 0
        previous = self.maps["CONFIG"].get(ct.c_uint32(0))
        cfg.grace_until_ns = previous.grace_until_ns if previous is not None else 0
        self._config = cfg
        self.maps["CONFIG"].put(ct.c_uint32(0), cfg)
        capture = self.maps["CAPTURE"]
        wanted = {}
        for ip in captures:
            k = maps.CaptureKey()
            k.addr = maps.IpAddr.of(ip)
            k.family = maps.family_of(ip)
            wanted[bytes(k)] = k
        for k in list(capture.keys()):
            if bytes(k) not in wanted:
                capture.delete(k)
        for k in wanted.values():
            capture.put(k, ct.c_uint32(1))

    def heartbeat(self) -> None:
        """CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns().  A live agent vouches for the
        answer map itself, so a predecessor's handover grace ends at its first beat."""
        self._config.heartbeat_ns = time.monotonic_ns()
        self._config.grace_until_ns = 0
        self.maps["CONFIG"].put(ct.c_uint32(0), self._config)

    def hand_over(self, grace: float) -> None:
        """A graceful stop with a successor coming (a DaemonSet rollout): the filters and
        maps stay, the heartbeat stops (so everything fails open to the pod's own server),
        and the fast path keeps answering from the answer map for ``grace`` seconds, for the
        names no other server knows (mesh hosts).  The successor ends the grace at its first
        heartbeat; if none comes, it simply runs out."""
        self._config.grace_until_ns = time.monotonic_ns() + int(grace * 1e9)
        self.maps["CONFIG"].put(ct.c_uint32(0), self._config)
        log.info(
            "handing over: %d veth(s) stay attached; the kernel answers from its answer map "
            "for %.0f s",
            len(self.attached),
            grace,
        )

    def remove_pins(self) -> None:
        """Uninstall: unpin every map (the programs and maps go once nothing holds them)."""
        for m in self.maps.values():
            m.close()
        self.maps = {}
        pin_dir = self.settings.pin_dir
        for path in sorted(pin_dir.glob("*")):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            pin_dir.rmdir()
        log.info("removed the pinned maps in %s", pin_dir)

    # ------------------------------------------------------------ attach

    def reconcile(self, desired: Mapping[int, tuple[str, Iterable[str]]]) -> None:
        """Make the attachments and pod entries exactly ``desired``: ifindex -> (ifname, pod
        IPs on that veth)."""
        assert self._ipr is not None
        s = self.settings
        gone: set[str] = set()
        for ifindex in list(self.attached):
            if ifindex not in desired:
                gone.update(self.attached[ifindex].pods)
                self._detach(ifindex)
        for ifindex, (ifname, ips) in desired.items():
            att = self.attached.get(ifindex)
            if att is None:
                self._attach(ifindex, ifname)
                att = self.attached[ifindex] = Attachment(ifindex, ifname)
            want = set(ips)
            for ip in list(att.pods):
                if ip not in want:
                    self.maps["PODS"].delete(_pod_key(ifindex, ip))
                    self._release_id(ip)
                    del att.pods[ip]
                    gone.add(ip)
            for ip in want - set(att.pods):
                pod_id = self._id_for(ip)
                info = maps.PodInfo()
                info.pod_id = pod_id
                now = time.monotonic_ns()  # bpf_ktime_get_ns's clock
                info.tokens, info.tokens_ts = s.flow_burst * 1_000_000_000, now
                info.queries.tokens, info.queries.ts = s.query_burst * 1_000_000_000, now
                info.answers.tokens, info.answers.ts = s.answer_burst * 1_000_000_000, now
                self.maps["PODS"].put(_pod_key(ifindex, ip), info)
                att.pods[ip] = pod_id
        self._sweep_stale_pods(desired)
        self._forget_flows(gone - {ip for att in self.attached.values() for ip in att.pods})

    def _forget_flows(self, ips: set[str]) -> None:
        """A deleted pod's flows go with it: its address may be given to the next pod, which
        must not inherit them (the LRU would only age them out)."""
        if not ips:
            return
        flows = self.maps["FLOWS"]
        for key in list(flows.keys()):
            if key.pod.text(key.family) in ips:
                flows.delete(key)

    def _sweep_stale_pods(self, desired: Mapping[int, tuple[str, Iterable[str]]]) -> None:
        """Entries left in the pinned maps by an earlier agent for veths no longer ours."""
        for key, _ in list(self.maps["PODS"].items()):
            ip = key.addr.text(key.family)
            if key.ifindex not in desired or ip not in self.attached[key.ifindex].pods:
                self.maps["PODS"].delete(key)
        for key in list(self.maps["IFACES"].keys()):
            if key.value not in desired:
                self.maps["IFACES"].delete(key)

    def _attach(self, ifindex: int, ifname: str) -> None:
        s = self.settings
        tc.ensure_clsact(self._ipr, ifindex)
        tc.replace_filter(
            self._ipr,
            ifindex,
            "ingress",
            self.fds[PROG_FROM_POD],
            PROG_FROM_POD,
            s.tc_prio,
            s.tc_handle,
        )
        tc.replace_filter(
            self._ipr, ifindex, "egress", self.fds[PROG_TO_POD], PROG_TO_POD, s.tc_prio, s.tc_handle
        )
        self.maps["IFACES"].put(ct.c_uint32(ifindex), maps.IfaceInfo())
        self._report_neighbours(ifindex, ifname)
        log.info(
            "attached to %s (ifindex %d), prio %d handle %#x",
            ifname,
            ifindex,
            s.tc_prio,
            s.tc_handle,
        )

    def _report_neighbours(self, ifindex: int, ifname: str) -> None:
        s = self.settings
        tcx = tcx_programs(ifindex)
        if tcx and (tcx.get("ingress") or tcx.get("egress")):
            log.warning(
                "%s has tcx programs (ingress %s, egress %s): on this kernel they run "
                "BEFORE our tc filters and may redirect pod DNS past us",
                ifname,
                tcx.get("ingress"),
                tcx.get("egress"),
            )
        for f in tc.list_filters(self._ipr, ifindex):
            if (f.prio, f.handle) != (s.tc_prio, s.tc_handle) and f.prio <= s.tc_prio:
                log.warning(
                    "%s: foreign %s filter %r at prio %d runs before ours",
                    ifname,
                    f.direction,
                    f.name,
                    f.prio,
                )

    def _detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex)
        for direction in ("ingress", "egress"):
            tc.delete_filter(
                self._ipr, ifindex, direction, self.settings.tc_prio, self.settings.tc_handle
            )
        for ip in att.pods:
            self.maps["PODS"].delete(_pod_key(ifindex, ip))
            self._release_id(ip)
        self.maps["IFACES"].delete(ct.c_uint32(ifindex))
        log.info("detached from %s (ifindex %d)", att.ifname, ifindex)

    def detach_all(self) -> None:
        for ifindex in list(self.attached):
            try:
                self._detach(ifindex)
            except InterceptorError as exc:
                log.warning("%s", exc)

    def _id_for(self, ip: str) -> int:
        if ip in self._pod_ids:
            return self._pod_ids[ip]
        if self._free_ids:
            pod_id = self._free_ids.pop()
        else:
            pod_id = self._next_id
            self._next_id += 1
        if pod_id >= maps.MAX_PODS:
            raise BpfError(f"more than {maps.MAX_PODS} pod addresses on this node")
        self._pod_ids[ip] = pod_id
        self.maps["POD_STATS"].zero_percpu(ct.c_uint32(pod_id))
        self.maps["TCP_CONNS"].put(ct.c_uint32(pod_id), ct.c_uint32(0))
        return pod_id

    def _release_id(self, ip: str) -> None:
        pod_id = self._pod_ids.pop(ip, None)
        if pod_id is not None:
            self._free_ids.append(pod_id)

    def correct_tcp_counts(self, live: Mapping[str, int]) -> int:
        """Lower the kernel's count of a pod's TCP connections where it has stayed above the
        resolver's own count (``live``: connections open per client address) for two passes:
        a connection whose flow left the LRU before its FIN would otherwise count forever.
        An excess seen once may be connections still in their handshake (counted at the SYN,
        not yet accepted); a leak is still there at the next pass, and only the part seen
        both times is taken off.  Returns how many counts were lowered."""
        counts = self.maps["TCP_CONNS"]
        fixed = 0
        excess: dict[int, int] = {}
        for ip, pod_id in list(self._pod_ids.items()):
            key = ct.c_uint32(pod_id)
            have = counts.get(key)
            if have is None:
                continue
            over = int(have.value) - live.get(ip, 0)
            if over <= 0:
                continue
            leaked = min(over, self._tcp_excess.get(pod_id, 0))
            if leaked:
                counts.put(key, ct.c_uint32(int(have.value) - leaked))
                fixed += 1
            excess[pod_id] = over - leaked
        self._tcp_excess = excess
        return fixed

    # ------------------------------------------------------------ queries

    def original_destination(self, pod_ip: str, pod_port: int, tcp: bool) -> str | None:
        """The server a pod's query was addressed to, from the flow its packet created."""
        reader = self._flow_reader
        if reader is None:
            reader = self._flow_reader = FlowReader(self.maps["FLOWS"].fd)
        return reader.original_destination(pod_ip, pod_port, tcp)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        if self._ipr is not None:
            self._ipr.close()
        if self.bpf is not None:
            self.bpf.cleanup()


class FlowReader:
    """Reads a flow's original destination for every cached answer the resolver serves, so
    it builds no ctypes objects and parses no addresses per call: one key and one value
    buffer, packed in place, and the few server addresses' texts remembered."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._key = ct.create_string_buffer(ct.sizeof(maps.FlowKey))
        self._val = ct.create_string_buffer(ct.sizeof(maps.FlowVal))
        self._texts: dict[bytes, str] = {}

    def original_destination(self, pod_ip: str, pod_port: int, tcp: bool) -> str | None:
        v6 = ":" in pod_ip
        try:
            packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, pod_ip)
        except OSError:
            return None
        key = self._key
        # struct flow_key: the address (16 bytes, zero-padded), the port in network order,
        # the protocol and the family.
        FLOW_KEY.pack_into(
            key,
            0,
            packed,
            socket.htons(pod_port),
            socket.IPPROTO_TCP if tcp else socket.IPPROTO_UDP,
            maps.FAMILY_V6 if v6 else maps.FAMILY_V4,
        )
        if lib.bpf_lookup_elem(self.fd, key, self._val) != 0:
            return None
        raw = self._val.raw[: 16 if v6 else 4]
        text = self._texts.get(raw)
        if text is None:
            if len(self._texts) > 1024:  # --capture-all: pods may ask many servers
                self._texts.clear()
            text = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw)
            self._texts[raw] = text
        return text


FLOW_KEY = struct.Struct("=16sHBB")


def _pod_key(ifindex: int, ip: str) -> maps.PodKey:
    k = maps.PodKey()
    k.ifindex = ifindex
    k.family = maps.family_of(ip)
    k.addr = maps.IpAddr.of(ip)
    return k


def open_maps(pin_dir: Path) -> dict[str, PinnedMap]:  # type: ignore[type-arg]
    """Every pinned map of ours, typed by its ctypes mirror (the fast path's only when the
    programs were built with it)."""
    return {
        name: PinnedMap(pin_dir / name, d.key, d.value, percpu=d.percpu)
        for name, d in maps.REGISTRY.items()
        if not d.fastpath or (pin_dir / "FP_ANSWERS").exists()
    }

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

from interceptor.datapath import maps, tc
from interceptor.datapath.bpfsys import BpfError, ElemLookup, PinnedMap, ensure_bpffs, lib
from interceptor.datapath.build import (
    PROG_DIR,
    PROG_FROM_POD,
    PROG_TO_POD,
    PROGRAMS,
    BuildSpec,
    bpf_source_dir,
    build_in_child,
    prog_pin,
)
from interceptor.datapath.tcx import tcx_programs
from interceptor.errors import InterceptorError
from interceptor.settings import DatapathSettings

log = logging.getLogger(__name__)


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
    views: dict[str, int] = field(default_factory=dict)
    """pod IP -> the view written into its PODS entry"""


class Datapath:
    def __init__(self, settings: DatapathSettings) -> None:
        self.settings = settings
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

    def build_spec(self) -> BuildSpec:
        s = self.settings
        return BuildSpec(
            pin_dir=str(s.pin_dir),
            fastpath=s.fastpath,
            fastpath_entries=s.fastpath_entries,
            fastpath_cached=s.fastpath_cached,
            enable_tcp=s.enable_tcp,
            enable_ipv6=s.enable_ipv6,
            kernel_headers=s.kernel_headers,
        )

    def load(self) -> None:
        """Build and pin the programs and maps in a child (LLVM never enters this process),
        then open the pins."""
        from interceptor.datapath.netlink import IPRoute

        if ensure_bpffs(self.settings.pin_dir.parent):
            log.info("mounted bpffs at %s", self.settings.pin_dir.parent)
        log.info("building the BPF programs (%s) in a child process", bpf_source_dir())
        built = build_in_child(self.build_spec())
        fds = {}
        for name in PROGRAMS:
            fd = lib.bpf_obj_get(str(prog_pin(self.settings.pin_dir, name)).encode())
            if fd < 0:
                raise InterceptorError(
                    f"cannot open the pinned program {name}: {os.strerror(ct.get_errno())}"
                )
            fds[name] = fd
        self.fds = fds
        log.info(
            "BPF programs compiled and loaded in %.2fs against %s (pinned in %s; %d map "
            "entries carried over from the previous agent's maps)",
            built.seconds,
            built.headers,
            self.settings.pin_dir,
            built.carried,
        )
        self.maps = open_maps(self.settings.pin_dir)
        self._ipr = IPRoute()
        self._adopt_pod_ids()

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

    def cached_by_server(self, on: bool) -> None:
        """Whether the kernel's cached answers are keyed by the server the pod asked (the
        resolver forwards to it) or are the same for every server (a fixed upstream)."""
        if on:
            self._config.flags |= maps.CFG_CACHED_BY_SERVER
        else:
            self._config.flags &= ~maps.CFG_CACHED_BY_SERVER
        self.maps["CONFIG"].put(ct.c_uint32(0), self._config)

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
        for path in sorted(pin_dir.glob("*")) + sorted((pin_dir / PROG_DIR).glob("*")):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
        for d in (pin_dir / PROG_DIR, pin_dir):
            with contextlib.suppress(OSError):
                d.rmdir()
        log.info("removed the pinned maps in %s", pin_dir)

    # ------------------------------------------------------------ attach

    def reconcile(
        self,
        desired: Mapping[int, tuple[str, Iterable[str]]],
        views: Mapping[str, int] | None = None,
    ) -> None:
        """Make the attachments and pod entries exactly ``desired``: ifindex -> (ifname, pod
        IPs on that veth); ``views``: pod IP -> its namespace's FP_ANSWERS view (absent: 0,
        the answers every pod gets)."""
        views = views or {}
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
                elif att.views.get(ip, 0) != (view := views.get(ip, 0)):
                    self._set_view(ifindex, ip, view)
                    att.views[ip] = view
            for ip in want - set(att.pods):
                pod_id = self._id_for(ip)
                info = maps.PodInfo()
                info.pod_id = pod_id
                now = time.monotonic_ns()  # bpf_ktime_get_ns's clock
                info.tokens, info.tokens_ts = s.flow_burst * 1_000_000_000, now
                info.queries.tokens, info.queries.ts = s.query_burst * 1_000_000_000, now
                info.answers.tokens, info.answers.ts = s.answer_burst * 1_000_000_000, now
                info.view = views.get(ip, 0)
                self.maps["PODS"].put(_pod_key(ifindex, ip), info)
                att.pods[ip] = pod_id
                att.views[ip] = info.view
        self._sweep_stale_pods(desired)
        self._forget_flows(gone - {ip for att in self.attached.values() for ip in att.pods})

    def _set_view(self, ifindex: int, ip: str, view: int) -> None:
        """A pod's view changed in place (its address now a pod's of another namespace):
        its buckets are kept, and a packet sees the old entry or the new one."""
        key = _pod_key(ifindex, ip)
        info = self.maps["PODS"].get(key)
        if info is not None:
            info.view = view
            self.maps["PODS"].put(key, info)

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
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


class FlowReader:
    """Reads a flow's original destination for every cached answer the resolver serves, so
    it builds no ctypes objects and parses no addresses per call: one key and one value
    buffer, packed in place, one system call, and the few server addresses' texts
    remembered."""

    def __init__(self, fd: int) -> None:
        self._lookup = ElemLookup(fd, ct.sizeof(maps.FlowKey), ct.sizeof(maps.FlowVal))
        self._texts: dict[bytes, str] = {}

    def original_destination(self, pod_ip: str, pod_port: int, tcp: bool) -> str | None:
        v6 = ":" in pod_ip
        try:
            packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, pod_ip)
        except OSError:
            return None
        lookup = self._lookup
        # struct flow_key: the address (16 bytes, zero-padded), the port in network order,
        # the protocol and the family.
        FLOW_KEY.pack_into(
            lookup.key,
            0,
            packed,
            socket.htons(pod_port),
            socket.IPPROTO_TCP if tcp else socket.IPPROTO_UDP,
            maps.FAMILY_V6 if v6 else maps.FAMILY_V4,
        )
        if not lookup():
            return None
        raw = lookup.value.raw[: 16 if v6 else 4]
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

"""The agent's operations side in one place: the state file the inspection CLI reads, the
admin socket, the BPF metrics and the programming-time histogram.  The agent calls it at a
few points; none of it is on the DNS path."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram

from interceptor.model.nodepods import NodePod
from interceptor.ops.admin import AdminError, AdminServer
from interceptor.ops.collector import BpfCollector, programming_histogram
from interceptor.ops.counters import CounterReader
from interceptor.ops.state import AgentInfo, NodeState, PodEntry, write_state
from interceptor.resolve.resolver import Resolver
from interceptor.settings import STATE_FILE

log = logging.getLogger(__name__)


class _Attachment(Protocol):
    ifname: str
    pods: dict[str, int]


class AgentOps:
    def __init__(self, state_dir: Path, admin_socket: Path | None, info: AgentInfo) -> None:
        self.state_dir = state_dir
        self.admin_socket = admin_socket
        self.state = NodeState(info)
        self.admin: AdminServer | None = None
        self.reader: CounterReader | None = None
        self.histogram: Histogram | None = None
        self._warned = False

    @classmethod
    def info(
        cls,
        node: str,
        version: str,
        pin_path: Path,
        admin_socket: Path | None,
        resolvers: Sequence[str],
        captures: Sequence[str],
        tc_prio: int,
        tc_handle: int,
    ) -> AgentInfo:
        return AgentInfo(
            pid=os.getpid(),
            node=node,
            version=version,
            started_at=time.time(),
            pin_path=str(pin_path),
            admin_socket=str(admin_socket) if admin_socket else None,
            resolver_addresses=tuple(resolvers),
            captures=tuple(captures),
            tc_prio=tc_prio,
            tc_handle=tc_handle,
        )

    # ------------------------------------------------------------ state file

    def publish(self, pods: Sequence[NodePod], attached: Mapping[int, _Attachment]) -> None:
        """Record which pod owns each counter slot and veth (called after each change)."""
        names = {ip: (p.namespace, p.name) for p in pods for ip in p.ips}
        entries = []
        for ifindex, att in sorted(attached.items()):
            for ip, pod_id in sorted(att.pods.items()):
                ns, name = names.get(ip, ("", ip))
                entries.append(PodEntry(pod_id, ns, name, ip, ifindex, att.ifname))
        self.state = replace(self.state, pods=tuple(entries), written_at=time.time())
        try:
            write_state(self.state_dir, self.state)
        except OSError as exc:  # inspection loses names; DNS must not suffer for it
            if not self._warned:
                log.warning("cannot write the state file in %s: %s", self.state_dir, exc)
                self._warned = True

    @contextlib.contextmanager
    def programming(
        self, pods: Sequence[NodePod], attached: Mapping[int, _Attachment]
    ) -> Iterator[None]:
        """Time one change of the datapath, then publish the new state (also after a
        partial failure: what is attached is what the state file must say)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            if self.histogram is not None:
                self.histogram.observe(time.monotonic() - t0)
            self.publish(pods, attached)

    # ------------------------------------------------------------ metrics

    def register_metrics(self, registry: CollectorRegistry | None, pin_dir: Path) -> None:
        if registry is None:
            return
        self.reader = CounterReader(pin_dir, lambda: self.state)
        registry.register(BpfCollector(self.reader.read))
        self.histogram = programming_histogram(registry)

    # ------------------------------------------------------------ admin

    async def start_admin(self, resolver: Resolver, status: Callable[[], dict[str, Any]]) -> None:
        if self.admin_socket is None:
            return
        admin = AdminServer(self.admin_socket, resolver, status)
        try:
            await admin.start()
        except AdminError as exc:  # inspection is not worth failing the node's DNS for
            log.warning("no admin endpoint: %s", exc)
            return
        self.admin = admin

    def remove_state(self) -> None:
        """Uninstall: the state file goes with the pins it describes."""
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.reader is not None:
            self.reader.close()

"""The agent's state file: which pod each counter slot and veth belongs to.

The kernel only knows pod ids (slots in the per-pod counters) and interface indexes; the names
come from the Kubernetes API, which the inspection CLI must not need.  So the agent writes
``<state-dir>/state.json`` (default ``/run/dns-interceptor``) on every change of its
attachments, atomically (write to a temporary file, then rename), and it stays there when
the agent dies: ``interceptor stats`` and ``net show`` still name the pods while it is down.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from interceptor.errors import InterceptorError
from interceptor.settings import STATE_FILE

FORMAT = 1


class StateError(InterceptorError):
    """cannot read the agent's state file."""


@dataclass(frozen=True)
class PodEntry:
    """One pod address captured on one veth."""

    pod_id: int
    namespace: str
    name: str
    ip: str
    ifindex: int
    ifname: str

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AgentInfo:
    pid: int
    node: str
    version: str
    started_at: float
    pin_path: str
    admin_socket: str | None
    resolver_addresses: tuple[str, ...]
    captures: tuple[str, ...]
    tc_prio: int
    tc_handle: int


@dataclass(frozen=True)
class NodeState:
    agent: AgentInfo
    pods: tuple[PodEntry, ...] = ()
    written_at: float = field(default_factory=time.time)

    def by_pod_id(self) -> dict[int, PodEntry]:
        return {p.pod_id: p for p in self.pods}

    def by_ifindex(self) -> dict[int, list[PodEntry]]:
        out: dict[int, list[PodEntry]] = {}
        for p in self.pods:
            out.setdefault(p.ifindex, []).append(p)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> NodeState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a state file of this version")
        a = data["agent"]
        agent = AgentInfo(
            pid=int(a["pid"]),
            node=str(a["node"]),
            version=str(a["version"]),
            started_at=float(a["started_at"]),
            pin_path=str(a["pin_path"]),
            admin_socket=a.get("admin_socket"),
            resolver_addresses=tuple(a["resolver_addresses"]),
            captures=tuple(a["captures"]),
            tc_prio=int(a["tc_prio"]),
            tc_handle=int(a["tc_handle"]),
        )
        pods = tuple(
            PodEntry(
                pod_id=int(p["pod_id"]),
                namespace=str(p["namespace"]),
                name=str(p["name"]),
                ip=str(p["ip"]),
                ifindex=int(p["ifindex"]),
                ifname=str(p["ifname"]),
            )
            for p in data["pods"]
        )
        return cls(agent, pods, float(data["written_at"]))


def write_state(state_dir: Path, state: NodeState) -> None:
    """Replace the state file atomically: a reader sees the old file or the new, never half."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, state_dir / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(state_dir: Path) -> NodeState | None:
    """The last state the agent wrote, or None if it never wrote one there."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from exc
    try:
        return NodeState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: {exc}") from exc


def agent_alive(state: NodeState | None) -> bool:
    """Whether the process that wrote the state still runs (and is an interceptor: a
    recycled pid belongs to something else)."""
    if state is None:
        return False
    try:
        cmdline = Path(f"/proc/{state.agent.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"interceptor" in cmdline

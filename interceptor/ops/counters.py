"""The datapath's counters, summed over CPUs and named: per pod (``stats``, ``top``, the
per-pod metrics) and per reason (and any other :data:`~interceptor.ops.catalog.COUNTER_SETS`).

A pod may have several addresses (dual stack), each with its own counter slot; they are
added up under the pod's name.  Slots the state file does not name (an agent that never
wrote one) are shown by address.
"""

from __future__ import annotations

import ctypes as ct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from interceptor.datapath import maps
from interceptor.datapath.introspect import IntrospectError, RawMap
from interceptor.ops.catalog import COUNTER_SETS, sum_values
from interceptor.ops.state import NodeState

COUNTS: tuple[str, ...] = tuple(name for name, *_ in maps.PodStats._fields_)
"""Per-pod counters, as struct pod_stats has them (queries, redirected, passed, replies...)."""


@dataclass(frozen=True)
class PodCounters:
    namespace: str
    """Empty when the pod's name is unknown (then ``name`` is its address)."""
    name: str
    ips: tuple[str, ...]
    ifnames: tuple[str, ...]
    pod_ids: tuple[int, ...]
    counts: dict[str, int] = field(default_factory=dict)
    """Counter name (see :data:`COUNTS`) -> packets."""

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class Snapshot:
    taken_ns: int
    """CLOCK_MONOTONIC of the read, for rates."""
    pods: tuple[PodCounters, ...]
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    """Counter map name (``REASONS``, ...) -> label -> count."""
    interfaces: int = 0
    """Host veths under management (entries of IFACES)."""


@dataclass
class _Slot:
    pod_id: int
    ip: str
    ifindex: int
    ifname: str
    namespace: str = ""
    name: str = ""


class CounterReader:
    """Reads the counters from the pins under ``pin_dir``; opened once, read many times (a
    scrape, a ``top`` refresh).  ``state`` gives the names of pod ids."""

    def __init__(self, pin_dir: Path, state: Callable[[], NodeState | None]) -> None:
        self.pin_dir = pin_dir
        self.state = state
        self._maps: dict[str, RawMap] = {}
        self._lock = threading.Lock()  # scrapes come from the HTTP server's threads

    def _map(self, name: str) -> RawMap | None:
        m = self._maps.get(name)
        if m is None:
            path = self.pin_dir / name
            if not path.exists():
                return None
            m = self._maps[name] = RawMap.pinned(path)
        return m

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                m.close()
            self._maps.clear()

    def __enter__(self) -> CounterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slots(self, state: NodeState | None) -> dict[int, _Slot]:
        slots: dict[int, _Slot] = {}
        if state is not None:
            for p in state.pods:
                slots[p.pod_id] = _Slot(p.pod_id, p.ip, p.ifindex, p.ifname, p.namespace, p.name)
        pods = self._map("PODS")
        if pods is not None:
            for key, values in pods.items():
                k = maps.PodKey.from_buffer_copy(key)
                v = maps.PodInfo.from_buffer_copy(values[0])
                if v.pod_id not in slots:
                    ip = k.addr.text(k.family)
                    slots[v.pod_id] = _Slot(v.pod_id, ip, k.ifindex, f"if{k.ifindex}")
        return slots

    def read(self) -> Snapshot:
        with self._lock:
            return self._read()

    def _read(self) -> Snapshot:
        if not self.pin_dir.is_dir():
            raise IntrospectError(f"no pinned maps at {self.pin_dir} (is --pin-path right?)")
        state = self.state()
        stats = self._map("POD_STATS")
        if stats is None and self._map("REASONS") is None:
            raise IntrospectError(f"no interceptor counters pinned in {self.pin_dir}")
        grouped: dict[tuple[str, str], list[tuple[_Slot, maps.PodStats]]] = {}
        for slot in self._slots(state).values():
            counts = maps.PodStats()
            if stats is not None:
                values = stats.lookup(bytes(ct.c_uint32(slot.pod_id)))
                if values:
                    counts = sum_values([maps.PodStats.from_buffer_copy(v) for v in values])
            ident = (slot.namespace, slot.name) if slot.name else ("", slot.ip)
            grouped.setdefault(ident, []).append((slot, counts))
        pods = [_merge(ns, name, members) for (ns, name), members in sorted(grouped.items())]
        return Snapshot(
            time.monotonic_ns(),
            tuple(pods),
            {
                cs.map_name: self._counter_set(cs.map_name, cs.labels)
                for cs in COUNTER_SETS
                if self._map(cs.map_name) is not None
            },
            self._interfaces(),
        )

    def _counter_set(self, name: str, labels: Iterable[str]) -> dict[str, int]:
        m = self._map(name)
        out: dict[str, int] = {}
        if m is None:
            return out
        for i, label in enumerate(labels):
            values = m.lookup(bytes(ct.c_uint32(i)))
            out[label] = sum(ct.c_uint64.from_buffer_copy(v).value for v in values or ())
        return out

    def _interfaces(self) -> int:
        m = self._map("IFACES")
        return 0 if m is None else sum(1 for _ in m.keys())


def _merge(ns: str, name: str, members: list[tuple[_Slot, maps.PodStats]]) -> PodCounters:
    slots = sorted((s for s, _ in members), key=lambda s: s.pod_id)
    totals = {c: sum(getattr(v, c) for _, v in members) for c in COUNTS}
    return PodCounters(
        namespace=ns,
        name=name,
        ips=tuple(dict.fromkeys(s.ip for s in slots)),
        ifnames=tuple(dict.fromkeys(s.ifname for s in slots)),
        pod_ids=tuple(s.pod_id for s in slots),
        counts=totals,
    )


@dataclass(frozen=True)
class PodRate:
    pod: PodCounters
    """Counts at the later snapshot."""
    rates: dict[str, float]
    """Counter name -> per second."""

    def rate(self, name: str) -> float:
        return self.rates.get(name, 0.0)


def rates(before: Snapshot, after: Snapshot) -> list[PodRate]:
    """Per-second rates between two snapshots, busiest pod first.  A pod whose counters went
    down (its slot was reused by a new pod) counts from zero."""
    dt = max((after.taken_ns - before.taken_ns) / 1e9, 1e-9)
    old = {p.pod: p for p in before.pods}
    out = []
    for p in after.pods:
        prev = old.get(p.pod)
        r = {}
        for c in COUNTS:
            now, was = p.count(c), prev.count(c) if prev is not None else 0
            r[c] = (now - was if now >= was else now) / dt
        out.append(PodRate(p, r))
    out.sort(key=lambda r: (-r.rate("queries"), r.pod.pod))
    return out

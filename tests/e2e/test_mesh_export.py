"""ServiceEntry exportTo against a real kube-apiserver (issue 15): pods of two namespaces on
the netns node keep asking a mesh host through their veths while its entry's exportTo is
changed; each pod's answers follow within a second, and no pod ever gets an answer that is
neither its old one nor its new one (no VIP leaked, none flapping back).  Real BPF."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devlab.netns import Lab, PodSpec, stop
from tests.e2e.apiserver import Cluster
from tests.e2e.test_agent_watch import answer, pod, run_pod, start_kube_agent, wait
from tests.e2e.test_kube_source import served_path
from tests.helpers import DATA

HOST = "pay.mesh.test"
VIP = "192.0.2.201"
UPSTREAM_ANSWER = "192.0.2.99"
UPSTREAM = (f"--host-record={HOST},{UPSTREAM_ANSWER}",)
PODS = {"pa": ("10.244.1.10", "e2e3a"), "pb": ("10.244.1.11", "e2e3b")}
FOLLOW = 1.0  # seconds: the bound


def entry(export_to: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "pay", "namespace": "e2e3a"},
        "spec": {
            "hosts": [HOST],
            "addresses": [VIP],
            "resolution": "STATIC",
            "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
            "exportTo": export_to,
        },
    }


@pytest.fixture
def node(cluster: Cluster, tmp_path: Path) -> Iterator[Lab]:
    for ns in ("e2e3a", "e2e3b"):
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": ns},
            }
        )
    cluster.apply_file(DATA / "serviceentry-crd.yaml")
    wait(
        lambda: served_path(
            cluster, "/apis/networking.istio.io/v1/namespaces/e2e3a/serviceentries"
        ),
        30,
        "the ServiceEntry CRD",
    )
    cluster.apply(entry(["."]))
    lab = Lab(
        f"dx{uuid.uuid4().hex[:5]}", [PodSpec(n, ip, ns) for n, (ip, ns) in PODS.items()]
    ).up()
    pin = Path(f"/sys/fs/bpf/{lab.prefix}")
    try:
        for name, (ip, ns) in PODS.items():
            run_pod(cluster, name, ip, ns)
        agent = start_kube_agent(cluster, lab, tmp_path, pin, *UPSTREAM)
        try:
            yield lab
        finally:
            stop(agent.proc)
    finally:
        for name, (ip, ns) in PODS.items():
            cluster.delete(pod(name, ip, ns))
        cluster.delete(entry([]))
        lab.down()
        shutil.rmtree(pin, ignore_errors=True)


class Asker:
    """One pod asking the host over and over, every answer kept with the times its question
    was sent and answered."""

    def __init__(self, lab: Lab, pod: str) -> None:
        self.lab, self.pod = lab, pod
        self.seen: list[tuple[float, float, tuple[str, ...]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            got = tuple(answer(self.lab, self.pod, HOST))
            self.seen.append((sent, time.monotonic(), got))

    def since(self, t: float) -> list[tuple[float, float, tuple[str, ...]]]:
        return [seen for seen in self.seen if seen[1] >= t]


def follow(
    askers: dict[str, Asker], want: dict[str, str], before: dict[str, str]
) -> dict[str, float]:
    """After a change at time now: each pod's first new answer (seconds after the change),
    checking that every answer in between is its old or its new one, and that none goes
    back to the old once the new has come."""
    t0 = time.monotonic()
    wait(
        lambda: all((want[p],) in [g for _, _, g in a.since(t0)] for p, a in askers.items()),
        10,
        f"answers {want}",
    )
    time.sleep(0.5)  # a few more answers after the switch, to see none flap back
    took: dict[str, float] = {}
    for p, a in askers.items():
        answers = a.since(t0)
        first_new = next(done for _, done, got in answers if got == (want[p],))
        took[p] = first_new - t0
        for sent, done, got in answers:
            assert got in ((want[p],), (before[p],)), f"{p} got {got} {done - t0:.3f}s after"
            if sent > first_new:  # asked after the new answer had come
                assert got == (want[p],), f"{p} went back to {got} {done - t0:.3f}s after"
    return took


def test_answers_follow_an_export_change_within_a_second(cluster: Cluster, node: Lab) -> None:
    lab = node
    expected = {"pa": VIP, "pb": UPSTREAM_ANSWER}  # "." : its own namespace only
    wait(
        lambda: all(answer(lab, p, HOST) == [ip] for p, ip in expected.items()),
        30,
        "the private entry seen from e2e3a only",
    )
    askers = {p: Asker(lab, p) for p in PODS}
    timings: list[dict[str, float]] = []
    try:
        for export_to, now in (
            (["e2e3b"], {"pa": UPSTREAM_ANSWER, "pb": VIP}),  # to the other namespace only
            (["*"], {"pa": VIP, "pb": VIP}),
            (["~"], {"pa": UPSTREAM_ANSWER, "pb": UPSTREAM_ANSWER}),
            (["."], {"pa": VIP, "pb": UPSTREAM_ANSWER}),
        ):
            cluster.apply(entry(export_to))
            timings.append(follow(askers, now, expected))
            expected = now
    finally:
        for a in askers.values():
            a.stop.set()
        for a in askers.values():
            a.thread.join(5)
    worst = max(t for step in timings for t in step.values())
    print(f"exportTo changes followed in: {timings} (worst {worst:.3f}s)")
    assert worst <= FOLLOW, timings

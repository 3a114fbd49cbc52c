"""Removal: after `kubectl delete -k`, no tc filter, pin, address or state file of ours is
left, and pods resolve through CoreDNS.  The interceptor adds no iptables or nftables rule:
the node's rules with the DaemonSet and without it are the same (kube-proxy's own rules are
there in both).  The DaemonSet is applied again at the end."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.cluster import node
from tests.cluster.conftest import MESH_HOST, NS, Kube, Workload

AGENTS = "app.kubernetes.io/name=dns-interceptor"


def rules() -> str:
    """iptables (every table) and the nftables ruleset, counters and comments stripped."""
    ipt = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    ipt = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", ln) for ln in ipt.splitlines() if not ln.startswith("#")
    )
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    nft = re.sub(r"counter packets \d+ bytes \d+", "counter", nft)
    return ipt + "\n" + nft


def leftovers() -> list[str]:
    found = []
    for dev in Path("/sys/class/net").iterdir():
        for direction in ("ingress", "egress"):
            out = subprocess.run(["tc", "filter", "show", "dev", dev.name, direction],
                                 capture_output=True, text=True).stdout  # fmt: skip
            if "dnsi_" in out:
                found.append(f"tc filter on {dev.name} {direction}")
    if Path("/sys/fs/bpf/interceptor").exists():
        found.append(f"pins: {sorted(p.name for p in Path('/sys/fs/bpf/interceptor').iterdir())}")
    if "169.254.20.10" in subprocess.run(["ip", "addr", "show", "dev", "lo"],
                                         capture_output=True, text=True).stdout:  # fmt: skip
        found.append("169.254.20.10 on lo")
    if Path("/run/dns-interceptor/state.json").exists():
        found.append("/run/dns-interceptor/state.json")
    return found


def test_delete_leaves_nothing_and_adds_no_rules(kube: Kube, workload: Workload) -> None:
    kube.rollout()
    with_ds = rules()
    assert not kube.exec(NS, workload.clients[0], "dig", "+short", MESH_HOST) == ""
    kube("delete", "-k", str(node.ROOT / "deploy" / "local"), "--wait=true", timeout=120)
    kube.wait("the agent pods to go",
              lambda: not kube.json("-n", "kube-system", "get", "pods", "-l", AGENTS)["items"],
              120)  # fmt: skip
    try:
        assert leftovers() == []
        pod = workload.clients[0]
        got = kube.exec(NS, pod, "getent", "ahostsv4", "kubernetes.default").split()
        assert got and got[0] == node.API_SERVICE_IP
        out = kube.exec(NS, pod, "dig", "+time=2", "+tries=1", MESH_HOST)
        assert "status: NXDOMAIN" in out, out  # CoreDNS answers now: no mesh VIP
        without_ds = rules()
        assert with_ds == without_ds
    finally:
        kube("apply", "-k", str(node.ROOT / "deploy" / "local"))
        kube.rollout()
    assert rules() == with_ds
    kube.wait(
        "the mesh VIP again",
        lambda: (
            kube.exec(
                NS,
                workload.clients[0],
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                MESH_HOST,
                check=False,
            ).strip()
            == workload.vip
        ),  # fmt: skip
        60,
    )

"""Restarts and rollouts without loss: a pod asks in a loop (UDP, 1 s timeout, one try) for a
cluster Service, a forwarded name and a mesh host while the DaemonSet is rolled
(`kubectl rollout restart`) and while its pod is force-deleted.  Cluster and forwarded names
fail open to kube-dns while no agent runs; the mesh host (CoreDNS would say NXDOMAIN) is kept
answering by the kernel during the handover grace."""

from __future__ import annotations

import subprocess
import time
from collections import Counter

from tests.cluster import node
from tests.cluster.conftest import EXTERNAL, MESH_HOST, NS, Kube, Workload, record_figure

LOOP = r"""
rm -f /tmp/stop
ask() {
  out=$(dig +time=1 +tries=1 "$2" A 2>&1)
  case $out in *"timed out"*|*"no servers could be reached"*) st=TIMEOUT ;;
    *) st=$(echo "$out" | sed -n 's/.*status: \([A-Z]*\),.*/\1/p') ;; esac
  ans=$(echo "$out" | awk '$4 == "A" { print $5; exit }')
  echo "$1 ${st:-NONE} ${ans:--} $(date +%s.%N)"
}
while [ ! -e /tmp/stop ]; do
  ask svc "$1"; ask fwd "$2"; ask mesh "$3"
  sleep 0.05
done
"""


def looping(kube: Kube, pod: str, svc: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(node.kubectl_bin()), f"--kubeconfig={node.KUBECONFIG}", "-n", NS, "exec", pod,
         "--", "sh", "-c", LOOP, "loop", svc, EXTERNAL[0], MESH_HOST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_through(kube: Kube, workload: Workload, disrupt: str) -> tuple[Counter[str], list[str]]:
    pod = workload.clients[1]
    svc = f"web.{NS}.svc.{node.CLUSTER_DOMAIN}"
    web = kube.json("-n", NS, "get", "svc", "web")["spec"]["clusterIP"]
    expect = {"svc": web, "fwd": EXTERNAL[1], "mesh": workload.vip}
    old = kube.agent_pod()
    proc = looping(kube, pod, svc)
    time.sleep(3)
    if disrupt == "rollout":
        kube("-n", "kube-system", "rollout", "restart", "ds/dns-interceptor")
    else:
        kube("-n", "kube-system", "delete", "pod", old, "--grace-period=0", "--force")
    kube.wait("a new agent pod", lambda: kube.agent_pod() != old, 120)
    kube.rollout()
    kube.wait(
        "the new agent to capture the pod again",
        lambda: f"{NS}/{pod}" in kube.captured(),
        60,
    )
    time.sleep(3)
    kube.exec(NS, pod, "touch", "/tmp/stop")
    out, err = proc.communicate(timeout=60)
    asked: Counter[str] = Counter()
    failed: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        label, status, answer, _ = parts
        asked[label] += 1
        if status != "NOERROR" or answer != expect[label]:
            failed.append(line)
    assert sum(asked.values()) > 100, (out[-2000:], err[-2000:])
    return asked, failed


def summary(asked: Counter[str], failed: list[str]) -> str:
    by = Counter(line.split()[0] for line in failed)
    return ", ".join(f"{k}: {by[k]} of {asked[k]} failed" for k in ("svc", "fwd", "mesh"))


def test_rollout_restart_loses_no_lookup(kube: Kube, workload: Workload) -> None:
    asked, failed = run_through(kube, workload, "rollout")
    record_figure("lookups lost during `kubectl rollout restart`", summary(asked, failed))
    assert failed == [], "\n".join(failed[:30])


def test_force_delete_loses_no_lookup(kube: Kube, workload: Workload) -> None:
    asked, failed = run_through(kube, workload, "force-delete")
    record_figure("lookups lost when the agent pod is force-deleted", summary(asked, failed))
    assert failed == [], "\n".join(failed[:30])


def test_control_without_the_handover_mesh_names_break(kube: Kube, workload: Workload) -> None:
    """The control: the same rollout with --handover-grace=0 (the kernel stops answering
    when the agent stops).  Mesh lookups fail in the gap, cluster and forwarded names still
    fail open to kube-dns: the loop above can see a gap, and the handover is what closes it."""
    patch = '[{"op":"add","path":"/spec/template/spec/containers/0/args/-",'
    patch += '"value":"--handover-grace=0"}]'
    kube("-n", "kube-system", "patch", "ds", "dns-interceptor", "--type=json", "-p", patch)
    kube.rollout()
    try:
        asked, failed = run_through(kube, workload, "rollout")
    finally:
        kube("apply", "-k", str(node.ROOT / "deploy" / "local"))
        kube.rollout()
    record_figure("control: rollout with --handover-grace=0", summary(asked, failed))
    by = Counter(line.split()[0] for line in failed)
    assert by["mesh"] > 0, "no mesh lookup failed without the handover: the loop sees no gap"
    assert by["svc"] == 0 and by["fwd"] == 0, "\n".join(failed[:30])

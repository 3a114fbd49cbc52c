"""The agent as the kubelet runs it: Ready through its own probes, never restarted, compiled
against the kernel headers its image carries (no hostPath for headers)."""

from __future__ import annotations

from tests.cluster.conftest import NS, Kube, Workload


def test_agent_ready_through_probes_without_restarts(kube: Kube) -> None:
    kube.rollout()
    pod = kube.json("-n", "kube-system", "get", "pod", kube.agent_pod())
    status = pod["status"]
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True"
    (container,) = status["containerStatuses"]
    assert container["ready"] and container["started"]
    assert container["restartCount"] == 0, container.get("lastState")
    probes = pod["spec"]["containers"][0]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(probes)


def test_no_kernel_header_mounts_and_bundled_headers_used(kube: Kube) -> None:
    pod = kube.json("-n", "kube-system", "get", "pod", kube.agent_pod())
    host_paths = {v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/run/dns-interceptor"}, host_paths
    log = kube("-n", "kube-system", "logs", kube.agent_pod())
    assert "against the image's kernel headers (/opt/dns-interceptor/kernel-headers" in log, log
    assert "BPF programs compiled and loaded" in log


def test_agent_captures_a_real_cni_veth(kube: Kube, workload: Workload) -> None:
    """The kubelet's pods sit behind veths the CNI made; the agent attached to them."""
    captured = kube.captured()
    for pod in workload.clients:
        assert f"{NS}/{pod}" in captured, captured
    out = kube.exec("kube-system", kube.agent_pod(), "interceptor", "stats")
    assert "agent running" in out

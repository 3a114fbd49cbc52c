"""The agent started the way the DaemonSet starts it, on a lab node (root).

From the rendered deploy/base DaemonSet: its command line (with the kubelet's $(VAR)
expansion from the ConfigMap), its environment, its capability list as the whole bounding
set (setpriv: root with only those capabilities, no_new_privs), and its filesystem: the root
and /sys read-only, /tmp an empty tmpfs, /sys/fs/bpf and the state directory writable mounts,
/lib/modules and /usr/src read-only.  Then deploy/smoke-test.sh runs against it with kubectl
replaced by tests/lab/kubectl_shim.py; everything below kubectl is real.

What differs from a real node, and why: maps are pinned in a lab-specific directory bound
over /sys/fs/bpf (a real agent's pins must not be touched); the service map comes from a YAML
file (``--source``) instead of the API server (the e2e tier covers the API); the optional
kube-dns ConfigMap volume is an empty directory outside /etc.  No container runtime runs
here, so seccomp and AppArmor are not exercised (see deploy/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devlab.netns import DNS_IP, RESOLVER_IP, Agent, Lab, LabError, PodSpec, stop
from tests.deploy_manifests import DEPLOY, AgentSpec, agent_spec, render
from tests.helpers import ROOT
from tests.lab.conftest import need_root

NODE = "node-1"
KUBERNETES_IP = "10.96.0.1"
SMOKE = PodSpec("dnsi-smoke", "10.244.1.20", "dnsi-smoke")
OPTOUT = PodSpec("dnsi-optout", "10.244.1.21", "quiet")
# SYS_RESOURCE only matters before kernel 5.11 (BPF memory charged to RLIMIT_MEMLOCK): the base
# leaves it out (deploy/components/kernel-5.8-5.10 adds it); the others must each be needed.
OLD_KERNELS_ONLY = {"SYS_RESOURCE"}


def cluster_yaml() -> str:
    objs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SMOKE.namespace}},
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "quiet", "labels": {"dns-interceptor.io/capture": "disabled"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": KUBERNETES_IP, "ports": [{"name": "https", "port": 443}]},
        },
    ]
    for pod in (SMOKE, OPTOUT):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace},
                "spec": {"nodeName": NODE},
                "status": {"podIPs": [{"ip": pod.ip}]},
            }
        )
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objs})


def host_capabilities() -> set[str]:
    """Capabilities this test process may keep (a sandbox may lack some, e.g. SYS_RESOURCE)."""
    out = subprocess.run(["setpriv", "--dump"], capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Capability bounding set:"))
    return {c.strip().upper() for c in line.split(":", 1)[1].split(",") if c.strip()}


def setpriv(caps: list[str]) -> list[str]:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    return [
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        f"--bounding-set={bounding}",
        "--no-new-privs",
        "--",
    ]


@dataclass
class Node:
    lab: Lab
    work: Path
    """Outside /tmp: the container's /tmp is an empty tmpfs over the host's."""
    spec: AgentSpec
    pin_root: Path
    """A bpffs directory bound over /sys/fs/bpf in the agent's mount namespace."""
    agent: Agent | None = None

    def container_script(self) -> str:
        """Shell run in a private mount namespace: the container's filesystem view, built
        from the DaemonSet's volumes and mounts."""
        c = self.spec.container
        lines = ["set -e", "mount --make-rprivate /"]
        state = self.work / "state"
        for m in c["volumeMounts"]:
            vol = self.spec.volumes[m["name"]]
            path = m["mountPath"]
            if path == "/sys/fs/bpf":
                lines.append(f"mount --bind {self.pin_root} /sys/fs/bpf")
            elif path == "/run/dns-interceptor":
                assert vol["hostPath"]["path"] == path
                # /run is the read-only image's own directory: a tmpfs holds the mount point.
                lines += [
                    "mount -t tmpfs -o size=1m tmpfs /run",
                    f"mkdir {path}",
                    f"mount --bind {state} {path}",
                    "mount -o remount,ro /run",
                ]
            elif path in ("/lib/modules", "/usr/src"):
                assert m["readOnly"] and vol["hostPath"]["path"] == path
            elif path in ("/tmp", "/etc/kube-dns"):
                pass  # below, after the root is read-only
            else:
                raise AssertionError(f"a mount this test does not emulate: {path}")
        lines.append(f"mount --bind {self.work} {self.work}")  # the source file, kube-dns dir
        if c["securityContext"]["readOnlyRootFilesystem"]:
            lines.append("mount -o remount,bind,ro /")
        lines.append("mount -o remount,bind,ro /sys")  # as the runtime mounts it unprivileged
        assert "emptyDir" in self.spec.volumes["tmp"]
        code = ROOT.resolve()
        hidden = code.is_relative_to("/tmp")
        if hidden:
            # The image has the code outside /tmp; a checkout under /tmp (a CI clone) would
            # vanish under the emptyDir, so it is kept open and bound back on top of it.
            lines.append(f"exec 9< {code}")
        lines.append("mount -t tmpfs -o size=256m tmpfs /tmp")
        if hidden:
            lines += [
                f"mkdir -p {code}",
                f"mount --no-canonicalize --bind /proc/self/fd/9 {code}",
                "exec 9<&-",
            ]
        lines.append('exec "$@"')
        return "\n".join(lines)

    def argv(self) -> list[str]:
        out = []
        for arg in self.spec.argv[1:]:
            if arg.startswith("--kube-dns-config="):
                arg = f"--kube-dns-config={self.work / 'kube-dns'}"
            out.append(arg)
        return [sys.executable, "-m", "interceptor", *out, "--source", str(self.work / "c.yaml")]

    def start_agent(self, caps: list[str], ready_timeout: float = 60) -> Agent:
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONDONTWRITEBYTECODE": "1",  # as the image: the root is read-only
            **self.spec.env,
        }
        cmd = [
            "nsenter",
            f"--net=/run/netns/{self.lab.node}",
            "unshare",
            "--mount",
            "sh",
            "-c",
            self.container_script(),
            "sh",
            *setpriv(caps),
            *self.argv(),
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd="/"
        )
        self.lab.procs.append(proc)
        self.agent = Agent(proc, self.pin_root / "interceptor")
        self.agent.wait_for("agent ready", ready_timeout)
        return self.agent

    def stop_agent(self) -> int | None:
        if self.agent is None:
            return None
        rc = stop(self.agent.proc)
        self.agent = None
        return rc

    def smoke(self, pod: PodSpec, **env: str) -> subprocess.CompletedProcess[str]:
        assert self.agent is not None
        config = {
            "node_netns": self.lab.node,
            "node_name": NODE,
            "agent_name": "dns-interceptor-lab",
            "agent_pid": self.agent.proc.pid,
            "health_port": "8053",
            "python": sys.executable,
            "setpriv": setpriv(self.caps),
            "kubernetes_ip": KUBERNETES_IP,
            "pods": {f"{p.namespace}/{p.name}": self.lab.pod_ns(p.name) for p in (SMOKE, OPTOUT)},
        }
        (self.work / "shim.json").write_text(json.dumps(config))
        shim = Path(__file__).with_name("kubectl_shim.py")
        return subprocess.run(
            ["bash", str(DEPLOY / "smoke-test.sh")],
            env={
                **os.environ,
                "SHIM_CONFIG": str(self.work / "shim.json"),
                "KUBECTL": f"{sys.executable} {shim}",
                "SMOKE_NAMESPACE": pod.namespace,
                "SMOKE_POD": pod.name,
                "SMOKE_TIMEOUT": "30",
                **env,
            },
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )

    @property
    def caps(self) -> list[str]:
        return [c for c in self.spec.capabilities if c in host_capabilities()]


@pytest.fixture
def node() -> Iterator[Node]:
    need_root()
    spec = agent_spec(render("base"), node_name=NODE)
    config = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in spec.argv if "=" in a}
    # The lab is built around the same addresses as the base's defaults.
    assert config["--capture"] == DNS_IP and config["--resolver-address"] == RESOLVER_IP
    lab = Lab(f"dd{uuid.uuid4().hex[:5]}", [SMOKE, OPTOUT]).up()
    work = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-", dir="/var/tmp"))
    pin_root = Path(f"/sys/fs/bpf/{lab.prefix}")
    n = Node(lab, work, spec, pin_root)
    try:
        (work / "state").mkdir()
        (work / "kube-dns").mkdir()  # the optional kube-dns ConfigMap, absent
        (work / "c.yaml").write_text(cluster_yaml())
        pin_root.mkdir()
        # kube-dns: answers what the interceptor would not (external names) and, for pods
        # that are not captured, the cluster name too.
        lab.start_upstream(
            "--host-record=kubernetes.io,192.0.2.80",
            f"--host-record=kubernetes.default.svc.cluster.local,{KUBERNETES_IP}",
        )
        yield n
    finally:
        n.stop_agent()
        lab.down()
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_agent_with_the_daemonsets_privileges_passes_the_smoke_test(node: Node) -> None:
    assert set(node.spec.capabilities) - OLD_KERNELS_ONLY <= set(node.caps), (
        "this machine cannot grant the DaemonSet's capabilities"
    )
    agent = node.start_agent(node.caps)
    # It is really confined: effective capabilities are the DaemonSet's (as far as granted).
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)
    assert bin(eff).count("1") == len(node.caps)
    r = node.smoke(SMOKE)
    print(r.stdout)  # shown with -rP: what a user sees on kind or the Vagrant VM
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke test passed" in r.stdout
    assert "none of them failed open" in r.stdout
    # The agent wrote its state where the DaemonSet mounts the host directory.
    assert any((node.work / "state").iterdir())
    assert node.stop_agent() == 0  # SIGTERM (as the kubelet): clean detach, exit 0


def test_agent_restarts_on_its_own_pins_with_the_daemonsets_privileges(node: Node) -> None:
    """A second start finds the first one's pinned maps.  Found on the real node: bcc reopens
    existing pins by map id (CAP_SYS_ADMIN), so every restart of the DaemonSet failed with
    "could not open bpf map: ... Operation not permitted"; the agent now pins the maps itself
    and carries their state over."""
    node.start_agent(node.caps)
    assert node.stop_agent() == 0
    assert (node.pin_root / "interceptor" / "PODS").exists()
    agent = node.start_agent(node.caps)
    assert any("carried over from the previous agent's maps" in ln for ln in agent.log)
    r = node.smoke(SMOKE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_smoke_test_fails_when_the_interceptor_does_not_answer(node: Node) -> None:
    """The smoke test notices a pod whose DNS bypasses the interceptor (here: its namespace
    opts out, so kube-dns answers it directly)."""
    node.start_agent(node.caps)
    r = node.smoke(OPTOUT, SMOKE_CAPTURE_WAIT="3")
    assert r.returncode != 0
    assert "has counted no query from quiet/dnsi-optout" in r.stderr


@pytest.mark.parametrize("drop", ["NET_ADMIN", "BPF", "PERFMON", "NET_BIND_SERVICE"])
def test_each_capability_is_needed(node: Node, drop: str) -> None:
    """Without any one of them the agent does not start: the list is not longer than it
    must be (SYS_RESOURCE excepted: it only matters on kernels before 5.11)."""
    assert drop in node.spec.capabilities
    assert set(node.spec.capabilities) - OLD_KERNELS_ONLY == {
        "NET_ADMIN",
        "BPF",
        "PERFMON",
        "NET_BIND_SERVICE",
    }, "a capability was added to the DaemonSet: add it here with the reason it is needed"
    with pytest.raises(LabError):
        node.start_agent([c for c in node.caps if c != drop], ready_timeout=30)
    assert node.agent is not None
    assert node.agent.proc.wait(timeout=10) != 0
    errors = [ln for ln in node.agent.log if "ERROR" in ln]
    assert errors, "\n".join(node.agent.log[-20:])

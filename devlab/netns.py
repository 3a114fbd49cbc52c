"""A Kubernetes node made of network namespaces, for the demo and the integration tests.

    pod netns (eth0) ──veth── node netns ──veth── "kube-dns" netns (10.96.0.10, dnsmasq)

* ``ptp`` mode is kindnet/Calico style: pod /32 addresses, a /32 route per pod on the node.
* ``bridge`` mode is flannel style: the host veths are ports of ``cni0``.

Nothing here routes out of the machine: the node namespace has no link but those above.
Each pod gets a kube-style ``/etc/netns/<pod>/resolv.conf`` (search path, ``ndots:5``), which
``ip netns exec`` shows to glibc as ``/etc/resolv.conf``.  Processes are started in the node
namespace with ``nsenter --net`` only, so they keep the host's mounts (``/sys/fs/bpf``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DNS_IP = "10.96.0.10"
DNS_IP6 = "fd00:96::a"
NODE_UPLINK = "10.200.0.1"
DNS_UPLINK = "10.200.0.2"
NODE_UPLINK6 = "fd00:200::1"
DNS_UPLINK6 = "fd00:200::2"
RESOLVER_IP = "169.254.20.10"
RESOLVER_IP6 = "fd00:a9fe::140a"
GATEWAY6 = "fe80::1"


class LabError(RuntimeError):
    pass


def sh(
    *cmd: str, check: bool = True, netns: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(full)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


@dataclass(frozen=True)
class PodSpec:
    name: str
    """Kubernetes pod name (also names its network namespace, with the lab prefix)."""
    ip: str
    namespace: str = "default"
    """Kubernetes namespace: decides the pod's search path."""
    ip6: str | None = None
    """An IPv6 address too (point-to-point mode only)."""


@dataclass
class Lab:
    prefix: str
    pods: list[PodSpec]
    mode: str = "ptp"
    gateway: str = "10.244.1.1"
    cluster_domain: str = "cluster.local"
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _up: bool = False

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    @property
    def dns(self) -> str:
        return f"{self.prefix}-dns"

    @property
    def state_dir(self) -> Path:
        """The agent's --state-dir: one per lab, so labs side by side never share a state
        file or an admin socket."""
        return Path(f"/run/{self.prefix}-interceptor")

    def pod_ns(self, pod: str) -> str:
        return f"{self.prefix}-{pod}"

    def host_veth(self, pod: str) -> str:
        names = [p.name for p in self.pods]
        return f"dvh{names.index(pod)}"

    # ------------------------------------------------------------ build

    def up(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def _build(self) -> None:
        for ns in [self.node, self.dns, *(self.pod_ns(p.name) for p in self.pods)]:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=self.node)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", netns=self.node)
        # node <-> kube-dns
        self._veth("dns0", self.dns)
        sh("ip", "addr", "add", f"{NODE_UPLINK}/30", "dev", "dns0", netns=self.node)
        sh("ip", "link", "set", "dns0", "up", netns=self.node)
        sh("ip", "route", "add", f"{DNS_IP}/32", "via", DNS_UPLINK, netns=self.node)
        sh("ip", "addr", "add", f"{DNS_UPLINK}/30", "dev", "eth0", netns=self.dns)
        sh("ip", "addr", "add", f"{DNS_IP}/32", "dev", "eth0", netns=self.dns)
        sh("ip", "link", "set", "eth0", "up", netns=self.dns)
        sh("ip", "route", "add", "default", "via", NODE_UPLINK, netns=self.dns)
        # IPv6 beside IPv4 ("nodad": no duplicate address detection wait in a lab).
        sh("ip", "addr", "add", f"{NODE_UPLINK6}/64", "dev", "dns0", "nodad", netns=self.node)
        sh("ip", "-6", "route", "add", f"{DNS_IP6}/128", "via", DNS_UPLINK6, netns=self.node)
        sh("ip", "addr", "add", f"{DNS_UPLINK6}/64", "dev", "eth0", "nodad", netns=self.dns)
        sh("ip", "addr", "add", f"{DNS_IP6}/128", "dev", "eth0", "nodad", netns=self.dns)
        sh("ip", "-6", "route", "add", "default", "via", NODE_UPLINK6, netns=self.dns)
        if self.mode == "bridge":
            sh("ip", "link", "add", "cni0", "type", "bridge", netns=self.node)
            sh("ip", "addr", "add", f"{self.gateway}/24", "dev", "cni0", netns=self.node)
            sh("ip", "link", "set", "cni0", "up", netns=self.node)
        for pod in self.pods:
            self._add_pod(pod)

    def _veth(self, host_side: str, peer_netns: str) -> None:
        """A veth pair: ``host_side`` in the node, ``eth0`` in ``peer_netns``."""
        sh(
            "ip",
            "link",
            "add",
            host_side,
            "netns",
            self.node,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            peer_netns,
        )

    def add_pod(self, pod: PodSpec) -> None:
        """A pod starting on the node after the fact: new namespace, new veth."""
        self.pods.append(pod)
        sh("ip", "netns", "add", self.pod_ns(pod.name))
        sh("ip", "link", "set", "lo", "up", netns=self.pod_ns(pod.name))
        self._add_pod(pod)

    def _add_pod(self, pod: PodSpec) -> None:
        ns, veth = self.pod_ns(pod.name), self.host_veth(pod.name)
        self._veth(veth, ns)
        sh("ip", "link", "set", veth, "up", netns=self.node)
        sh("ip", "link", "set", "eth0", "up", netns=ns)
        if self.mode == "bridge":
            sh("ip", "link", "set", veth, "master", "cni0", netns=self.node)
            sh("ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0", netns=ns)
            sh("ip", "route", "add", "default", "via", self.gateway, netns=ns)
        else:
            sh("ip", "addr", "add", f"{self.gateway}/32", "dev", veth, netns=self.node)
            sh("ip", "route", "add", f"{pod.ip}/32", "dev", veth, netns=self.node)
            sh("ip", "addr", "add", f"{pod.ip}/32", "dev", "eth0", netns=ns)
            sh("ip", "route", "add", self.gateway, "dev", "eth0", "scope", "link", netns=ns)
            sh("ip", "route", "add", "default", "via", self.gateway, "dev", "eth0", netns=ns)
            if pod.ip6:
                sh("ip", "addr", "add", f"{GATEWAY6}/64", "dev", veth, "nodad", netns=self.node)
                sh("ip", "-6", "route", "add", f"{pod.ip6}/128", "dev", veth, netns=self.node)
                sh("ip", "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad", netns=ns)
                sh("ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0", netns=ns)
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        z = self.cluster_domain
        (etc / "resolv.conf").write_text(
            f"nameserver {DNS_IP}\nsearch {pod.namespace}.svc.{z} svc.{z} {z}\n"
            "options ndots:5 timeout:2 attempts:2\n"
        )

    def remove_pod(self, pod: str) -> None:
        """A pod going away: its network namespace and veth pair disappear."""
        sh("ip", "netns", "del", self.pod_ns(pod), check=False)
        shutil.rmtree(Path("/etc/netns") / self.pod_ns(pod), ignore_errors=True)

    def down(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for ns in [*(self.pod_ns(p.name) for p in self.pods), self.dns, self.node]:
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        # dnsmasq drops root before it exits, so it cannot remove its own pid file.
        Path(f"/run/{self.prefix}-dnsmasq.pid").unlink(missing_ok=True)
        self._up = False

    # ------------------------------------------------------------ processes

    def run_in_pod(
        self, pod: str, *cmd: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return sh(*cmd, netns=self.pod_ns(pod), timeout=timeout, check=check)

    def start_upstream(self, *records: str, log: Path | None = None) -> subprocess.Popen[str]:
        """dnsmasq at the kube-dns address in its own namespace: the server pods use when the
        interceptor is not there, and the upstream it forwards to."""
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        args = [
            "ip",
            "netns",
            "exec",
            self.dns,
            dnsmasq,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            f"--listen-address={DNS_IP}",
            f"--listen-address={DNS_IP6}",
            "--bind-interfaces",
            f"--pid-file=/run/{self.prefix}-dnsmasq.pid",
            "--cache-size=0",
            *records,
        ]
        if log is not None:
            args += ["--log-queries", f"--log-facility={log}"]
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = sh(
                "dig",
                f"@{DNS_IP}",
                "+time=1",
                "+tries=1",
                "probe.invalid",
                netns=self.node,
                check=False,
            )
            if "status:" in r.stdout:
                return proc
            time.sleep(0.1)
        raise LabError("dnsmasq in the kube-dns namespace did not start")

    def start_agent(
        self,
        source: Path | None,
        *extra: str,
        ready_timeout: float = 60,
        pin_dir: Path | None = None,
    ) -> Agent:
        """The agent in the node namespace; ``source`` None means pass ``--kubeconfig`` in
        ``extra`` instead of a YAML file."""
        pin = pin_dir or Path(f"/sys/fs/bpf/{self.prefix}")
        cmd = [
            "nsenter",
            f"--net=/run/netns/{self.node}",
            sys.executable,
            "-m",
            "interceptor",
            "agent",
            *(["--source", str(source)] if source is not None else []),
            "--node-name",
            "node-1",
            "--capture",
            DNS_IP,
            "--capture",
            DNS_IP6,
            "--resolver-address",
            RESOLVER_IP,
            "--resolver-address",
            RESOLVER_IP6,
            "--pin-path",
            str(pin),
            "--state-dir",
            str(self.state_dir),
            "--health-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            *extra,
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs.append(proc)
        agent = Agent(proc, pin)
        agent.wait_for("agent ready", ready_timeout)
        return agent


@dataclass
class Agent:
    proc: subprocess.Popen[str]
    pin_dir: Path
    log: list[str] = field(default_factory=list)

    def wait_for(self, text: str, timeout: float) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line.rstrip("\n"))
            if text in line:
                self._drain()
                return line
        useful = [ln for ln in self.log if " interceptor" in ln or "Error" in ln]
        raise LabError(f"agent did not say {text!r}:\n" + "\n".join(useful[-30:]))

    def _drain(self) -> None:
        import threading

        def run() -> None:
            assert self.proc.stderr is not None
            with contextlib.suppress(ValueError, OSError):
                for ln in self.proc.stderr:
                    self.log.append(ln.rstrip("\n"))

        threading.Thread(target=run, daemon=True).start()


def stop(proc: subprocess.Popen[Any], timeout: float = 5) -> int:
    """SIGTERM, then SIGKILL after ``timeout``: by PID, never by name. A process that
    outlives the timeout first gets SIGUSR1, which makes ours print their threads' stacks."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            proc.kill()
            proc.wait()
    return proc.returncode

"""A real one-node Kubernetes cluster on this machine, with dns-interceptor deployed on it.

    python -m tests.cluster.node up [--cni ptp|bridge] [--proxy-mode iptables|nftables]
    python -m tests.cluster.node down
    python -m tests.cluster.node status

(`make cluster` and `make cluster-down`.)  Everything is a real component: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built from
the Go module proxy by scripts/build-peers.sh), containerd + runc + the CNI plugins (Debian
packages), CoreDNS deployed as kube-dns the way kubeadm deploys it, and the interceptor
DaemonSet applied with kustomize from deploy/local.  Every image is built here
(tests/cluster/images.py) and imported into containerd: nothing is pulled.

Containment: the node's addresses (NODE_IP, UPSTREAM_IP) live on ``lo``; the "internet" is a
dnsmasq on UPSTREAM_IP that answers a few external-style names; pods may only reach 10/8
addresses (one FORWARD rule, removed by ``down``).  Processes are started detached (their
PIDs in STATE/pids) and stopped by PID.

``up`` is idempotent: what runs is left running, what is missing is started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import images

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("INTERCEPTOR_CLUSTER_DIR", "/var/lib/dns-interceptor-cluster"))
RUN = Path("/run/dnsi-cluster")
NODE_NAME = "dnsi-node"
NODE_IP = "10.99.0.1"
UPSTREAM_IP = "10.99.0.53"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
DNS_IP = "10.96.0.10"
POD_CIDR = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
BRIDGE = "dnsi0"
API_PORT = 6443
ETCD_PORTS = (23790, 23800)
CLUSTER_DOMAIN = "cluster.local"
K8S_VERSION = "v1.34.4"

CACHE_BIN = Path(os.environ.get("INTERCEPTOR_CACHE", "/var/cache/dns-interceptor")) / "bin"
CONTAINERD_SOCK = RUN / "containerd.sock"
KUBECONFIG = STATE / "admin.kubeconfig"
BIN = STATE / "bin"
PIDS = STATE / "pids"
LOGS = STATE / "logs"
PKI = STATE / "pki"

# External-style names the stand-in upstream answers (RFC 5737 documentation addresses).
UPSTREAM_NAMES = {
    "kubernetes.io": "192.0.2.80",
    "example.org": "198.51.100.7",
    "www.example.com": "203.0.113.5",
}
CONTAIN_RULE = ["FORWARD", "-s", "10.244.0.0/16", "!", "-d", "10.0.0.0/8", "-j", "DROP"]
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}


class ClusterError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", file=sys.stderr, flush=True)


def run(*cmd: str | Path, check: bool = True, timeout: float = 120, **kw: Any) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))}: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


# ------------------------------------------------------------------ binaries


def peers() -> dict[str, Path]:
    say("Kubernetes components, etcd and CoreDNS (scripts/build-peers.sh; built once per machine)")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-peers.sh"), "coredns"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.split()
    return {Path(p).name.rsplit("-v", 1)[0]: Path(p) for p in out}


def kubectl_bin() -> Path:
    return BIN / "kubectl"


def kubectl(*args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
    return run(
        kubectl_bin(),
        f"--kubeconfig={KUBECONFIG}",
        *args,
        check=check,
        timeout=timeout,
        input=stdin,
    )


# ------------------------------------------------------------------ processes


def pid_of(name: str) -> int | None:
    path = PIDS / f"{name}.pid"
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    # A recycled PID is not ours: the command line must name the program we started.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return None
    expected = (PIDS / f"{name}.cmd").read_text() if (PIDS / f"{name}.cmd").exists() else ""
    return pid if cmdline == expected else None


STARTED: dict[str, subprocess.Popen[bytes]] = {}
"""The processes this run started: whether one exited is asked of the kernel (waitpid), not
guessed from /proc."""


def start(name: str, argv: Sequence[str | Path], env: dict[str, str] | None = None) -> int:
    """Start ``argv`` detached (its own session), logging to LOGS/<name>.log; idempotent."""
    pid = pid_of(name)
    if pid is not None:
        return pid
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=STATE,
    )
    (PIDS / f"{name}.pid").write_text(str(proc.pid))
    (PIDS / f"{name}.cmd").write_text(str(argv[0]))
    STARTED[name] = proc
    return proc.pid


def exited(name: str) -> str | None:
    """How ``name`` ended ("exit status N"), or None while it runs."""
    proc = STARTED.get(name)
    if proc is not None:
        rc = proc.poll()
        return None if rc is None else f"exit status {rc}"
    return "not running" if pid_of(name) is None else None


def stop(name: str, timeout: float = 15) -> None:
    pid = pid_of(name)
    if pid is not None:
        stop_pid(pid, timeout)
    (PIDS / f"{name}.pid").unlink(missing_ok=True)


def stop_pid(pid: int, timeout: float = 15) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def log_tail(name: str, lines: int = 25) -> str:
    try:
        return "\n".join((LOGS / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(what: str, check: Any, timeout: float, name: str | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
        ended = exited(name) if name is not None else None
        if name is not None and ended is not None:
            raise ClusterError(
                f"{name} ended ({ended}) while waiting for {what}:\n{log_tail(name)}"
            )
        time.sleep(0.5)
    tail = f"\n{log_tail(name)}" if name else ""
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} ({last}){tail}")


# ------------------------------------------------------------------ host network


def ensure_host() -> None:
    """Node addresses on lo, forwarding sysctls (old values saved), bpffs shared, and the
    rule that keeps pod traffic on this machine."""
    for ip in (NODE_IP, UPSTREAM_IP):
        if f" {ip}/32 " not in run("ip", "-4", "-o", "addr", "show", "dev", "lo"):
            run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    tables = STATE / "nft-tables.before"
    if not tables.exists():
        # iptables-nft makes nftables tables on first use (kubelet, kube-proxy, our rule):
        # those that were not here before are ours to remove on down.
        tables.write_text(run("nft", "list", "tables", check=False))
    saved = STATE / "sysctl.saved.json"
    if not saved.exists():
        old = {}
        for key in SYSCTLS:
            path = Path("/proc/sys") / key
            if path.exists():
                old[key] = path.read_text().strip()
        saved.write_text(json.dumps(old))
    for key, value in SYSCTLS.items():
        path = Path("/proc/sys") / key
        if path.exists():
            path.write_text(value)
    if not _is_mount("/sys/fs/bpf"):
        run("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
        (STATE / "bpffs.mounted").touch()
    # The DaemonSet mounts /sys/fs/bpf with HostToContainer propagation: runc needs the
    # source to be a shared (or slave) mount.
    run("mount", "--make-shared", "/sys/fs/bpf")
    if subprocess.run(["iptables", "-C", *CONTAIN_RULE], capture_output=True).returncode:
        run("iptables", "-I", *CONTAIN_RULE)


def restore_host() -> None:
    with contextlib.suppress(ClusterError):
        while True:
            run("iptables", "-D", *CONTAIN_RULE)
    for ip in (NODE_IP, UPSTREAM_IP):
        run("ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False)
    before = STATE / "nft-tables.before"
    if before.exists():
        had = set(before.read_text().splitlines())
        for table in run("nft", "list", "tables", check=False).splitlines():
            if table.startswith("table ") and table not in had:
                run("nft", "delete", *table.split()[0:], check=False)
    saved = STATE / "sysctl.saved.json"
    if saved.exists():
        for key, value in json.loads(saved.read_text()).items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)
    run("ip", "link", "del", BRIDGE, check=False)
    if (STATE / "bpffs.mounted").exists():
        run("umount", "/sys/fs/bpf", check=False)


def _is_mount(path: str) -> bool:
    return any(
        line.split()[4] == path for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


# ------------------------------------------------------------------ PKI


def _openssl(*args: str) -> None:
    run("openssl", *args)


def ensure_pki() -> None:
    PKI.mkdir(parents=True, exist_ok=True)
    ca = PKI / "ca"
    if not (PKI / "ca.crt").exists():
        say("certificates: a cluster CA and one client or serving certificate per component")
        _openssl("genrsa", "-out", f"{ca}.key", "2048")
        _openssl(
            "req", "-x509", "-new", "-key", f"{ca}.key", "-days", "3650", "-subj",
            "/CN=dns-interceptor-local-ca", "-out", f"{ca}.crt",
        )  # fmt: skip
        _openssl("genrsa", "-out", str(PKI / "sa.key"), "2048")
        _openssl("rsa", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    sans = ",".join(
        [
            f"IP:{NODE_IP}", f"IP:{API_SERVICE_IP}", "IP:127.0.0.1", "DNS:kubernetes",
            "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}", "DNS:localhost",
        ]
    )  # fmt: skip
    _cert("apiserver", "/CN=kube-apiserver", server_sans=sans)
    _cert("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
    _cert("admin", "/O=system:masters/CN=kubernetes-admin")
    _cert("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
    _cert("controller-manager", "/CN=system:kube-controller-manager")
    _cert("scheduler", "/CN=system:kube-scheduler")
    _cert("kube-proxy", "/CN=system:kube-proxy")


def _cert(name: str, subject: str, server_sans: str | None = None) -> None:
    crt = PKI / f"{name}.crt"
    if crt.exists():
        return
    key = PKI / f"{name}.key"
    _openssl("genrsa", "-out", str(key), "2048")
    csr = PKI / f"{name}.csr"
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = PKI / f"{name}.ext"
    usage = "serverAuth" if server_sans else "clientAuth"
    ext.write_text(
        f"keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        + (f"subjectAltName={server_sans}\n" if server_sans else "")
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca.crt"), "-CAkey",
        str(PKI / "ca.key"), "-CAcreateserial", "-days", "3650", "-extfile", str(ext),
        "-out", str(crt),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def write_kubeconfig(path: Path, user: str) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "dnsi-local",
                        "cluster": {
                            "server": f"https://{NODE_IP}:{API_PORT}",
                            "certificate-authority-data": b64(PKI / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": user,
                        "user": {
                            "client-certificate-data": b64(PKI / f"{user}.crt"),
                            "client-key-data": b64(PKI / f"{user}.key"),
                        },
                    }
                ],
                "contexts": [
                    {"name": "dnsi-local", "context": {"cluster": "dnsi-local", "user": user}}
                ],
                "current-context": "dnsi-local",
            }
        )
    )
    path.chmod(0o600)


# ------------------------------------------------------------------ control plane


def start_control_plane(bins: dict[str, Path]) -> None:
    for user in ("admin", "kubelet", "controller-manager", "scheduler", "kube-proxy"):
        write_kubeconfig(STATE / f"{user}.kubeconfig", user)
    etcd_client, etcd_peer = ETCD_PORTS
    start(
        "etcd",
        [
            bins["etcd"], "--name", "dnsi", "--data-dir", STATE / "etcd",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"dnsi=http://127.0.0.1:{etcd_peer}",
            "--log-level", "warn",
        ],
    )  # fmt: skip
    start(
        "kube-apiserver",
        [
            bins["kube-apiserver"], f"--advertise-address={NODE_IP}", f"--bind-address={NODE_IP}",
            f"--secure-port={API_PORT}", f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            f"--client-ca-file={PKI / 'ca.crt'}", f"--tls-cert-file={PKI / 'apiserver.crt'}",
            f"--tls-private-key-file={PKI / 'apiserver.key'}",
            f"--kubelet-client-certificate={PKI / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={PKI / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={PKI / 'sa.pub'}",
            f"--service-account-signing-key-file={PKI / 'sa.key'}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--v=1",
        ],
    )  # fmt: skip
    wait_for(
        "the API server",
        lambda: kubectl("get", "--raw=/readyz", check=True, timeout=10).strip() == "ok",
        90,
        "kube-apiserver",
    )
    cm_config = STATE / "controller-manager.kubeconfig"
    start(
        "kube-controller-manager",
        [
            bins["kube-controller-manager"], f"--kubeconfig={cm_config}",
            f"--authentication-kubeconfig={cm_config}", f"--authorization-kubeconfig={cm_config}",
            f"--service-account-private-key-file={PKI / 'sa.key'}",
            f"--root-ca-file={PKI / 'ca.crt'}", "--use-service-account-credentials=true",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--v=1",
        ],
    )  # fmt: skip
    start(
        "kube-scheduler",
        [
            bins["kube-scheduler"], f"--kubeconfig={STATE / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={STATE / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={STATE / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--v=1",
        ],
    )  # fmt: skip


# ------------------------------------------------------------------ node


def write_cni(cni: str) -> None:
    netd = STATE / "cni" / "net.d"
    netd.mkdir(parents=True, exist_ok=True)
    for old in netd.iterdir():
        old.unlink()
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(STATE / "cni" / "ipam"),
    }
    if cni == "ptp":
        # Point-to-point veths, a /32 route per pod (kindnet, Calico).
        main: dict[str, Any] = {"type": "ptp", "ipMasq": False, "mtu": 1500, "ipam": ipam}
    else:
        # One bridge, the host veths its ports (flannel's cni0).
        main = {
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
            "hairpinMode": True, "ipam": ipam,
        }  # fmt: skip
    conf = {
        "cniVersion": "1.0.0",
        "name": f"dnsi-{cni}",
        "plugins": [main, {"type": "portmap", "capabilities": {"portMappings": True}}],
    }
    (netd / "10-dnsi.conflist").write_text(json.dumps(conf, indent=2))
    (STATE / "cni" / "variant").write_text(cni)


def start_containerd() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    conf = STATE / "containerd.toml"
    # Kubelet and containerd lower the sandbox's OOM score (-998): that needs CAP_SYS_RESOURCE,
    # which some machines (this VM's sandbox among them) do not grant even to root.
    restrict_oom = not _has_capability(CAP_SYS_RESOURCE)
    conf.write_text(
        f"""version = 2
root = "{STATE / "containerd"}"
state = "{RUN / "containerd"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = {str(restrict_oom).lower()}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{STATE / "cni" / "net.d"}"
"""
    )
    start("containerd", [shutil.which("containerd") or "containerd", "--config", conf])
    wait_for("containerd", lambda: ctr("version", timeout=5), 30, "containerd")


CAP_SYS_RESOURCE = 24


def _has_capability(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def ctr(*args: str, timeout: float = 600, check: bool = True) -> str:
    return run(
        "ctr", "--address", CONTAINERD_SOCK, "-n", "k8s.io", *args, timeout=timeout, check=check
    )


def start_upstream() -> None:
    """The internet's DNS, as far as this cluster knows: dnsmasq on UPSTREAM_IP answering a
    few external-style names and NXDOMAIN for the rest (``local=/#/``: it forwards nothing,
    so nothing leaves the machine)."""
    argv: list[str | Path] = [
        shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
        "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={UPSTREAM_IP}",
        "--except-interface=eth0", "--port=53", "--cache-size=0", "--user=root",
        f"--pid-file={RUN / 'dnsmasq.pid'}", "--log-facility=-", "--local=/#/",
    ]  # fmt: skip
    for name, ip in UPSTREAM_NAMES.items():
        argv.append(f"--host-record={name},{ip}")
    start("upstream-dns", argv)


def start_kubelet(bins: dict[str, Path]) -> None:
    (STATE / "node-resolv.conf").write_text(f"nameserver {UPSTREAM_IP}\n")
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(STATE / "node-resolv.conf"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(PKI / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        # Images are imported, never pulled: garbage collection would lose them for good.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },  # fmt: skip
        "localStorageCapacityIsolation": False,
        "serializeImagePulls": False,
        "maxPods": 110,
        "podPidsLimit": -1,
        "shutdownGracePeriod": "0s",
    }
    (STATE / "kubelet.yaml").write_text(yaml.safe_dump(config))
    start(
        "kubelet",
        [
            bins["kubelet"], f"--config={STATE / 'kubelet.yaml'}",
            f"--kubeconfig={STATE / 'kubelet.kubeconfig'}", f"--root-dir={STATE / 'kubelet'}",
            f"--cert-dir={STATE / 'kubelet-pki'}", f"--node-ip={NODE_IP}",
            f"--hostname-override={NODE_NAME}", "--v=1",
        ],
    )  # fmt: skip
    wait_for("the node to be Ready", node_ready, 120, "kubelet")


def node_ready() -> bool:
    out = kubectl(
        "get", "node", NODE_NAME, "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False, timeout=10,
    )  # fmt: skip
    return out.strip() == "True"


def start_kube_proxy(bins: dict[str, Path], mode: str) -> None:
    current = (STATE / "proxy-mode").read_text() if (STATE / "proxy-mode").exists() else None
    if current is not None and current != mode and pid_of("kube-proxy") is not None:
        stop("kube-proxy")
        run(bins["kube-proxy"], "--cleanup", check=False)
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": mode,
        "clientConnection": {"kubeconfig": str(STATE / "kube-proxy.kubeconfig")},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the machine's conntrack sysctls alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },  # fmt: skip
    }
    (STATE / "kube-proxy.yaml").write_text(yaml.safe_dump(config))
    (STATE / "proxy-mode").write_text(mode)
    start("kube-proxy", [bins["kube-proxy"], f"--config={STATE / 'kube-proxy.yaml'}", "--v=1"])
    wait_for(
        f"kube-proxy ({mode} mode) to program the kubernetes Service",
        lambda: _proxy_programmed(mode),
        60,
        "kube-proxy",
    )


def _proxy_programmed(mode: str) -> bool:
    if mode == "nftables":
        return API_SERVICE_IP in run("nft", "list", "table", "ip", "kube-proxy", check=False)
    return API_SERVICE_IP in run("iptables-save", "-t", "nat", check=False)


# ------------------------------------------------------------------ cluster objects


def coredns_manifests() -> list[dict[str, Any]]:
    """CoreDNS as kubeadm deploys it: its RBAC, the Corefile kubeadm writes, a Deployment of
    two replicas and the kube-dns Service at the kubelet's clusterDNS address."""
    labels = {"k8s-app": "kube-dns"}
    corefile = f""".:53 {{
    errors
    health {{
       lameduck 5s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }}
    prometheus :9153
    forward . /etc/resolv.conf {{
       max_concurrent 1000
    }}
    cache 30 {{
       disable success {CLUSTER_DOMAIN}
       disable denial {CLUSTER_DOMAIN}
    }}
    loop
    reload
    loadbalance
}}
"""
    ports = [
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
        {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns",
                       "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "replicas": 2,
             "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "priorityClassName": "system-cluster-critical",
                     "serviceAccountName": "coredns",
                     "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
                     "nodeSelector": {"kubernetes.io/os": "linux"},
                     "dnsPolicy": "Default",
                     "containers": [{
                         "name": "coredns",
                         "image": images.COREDNS,
                         "imagePullPolicy": "IfNotPresent",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "resources": {"limits": {"memory": "170Mi"},
                                       "requests": {"cpu": "100m", "memory": "70Mi"}},
                         "volumeMounts": [{"name": "config-volume",
                                           "mountPath": "/etc/coredns", "readOnly": True}],
                         "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                                   {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
                                   {"containerPort": 9153, "name": "metrics",
                                    "protocol": "TCP"}],
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "initialDelaySeconds": 60, "timeoutSeconds": 5,
                                           "failureThreshold": 5},
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                         "securityContext": {
                             "allowPrivilegeEscalation": False,
                             "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                             "readOnlyRootFilesystem": True,
                         },
                     }],
                     "volumes": [{"name": "config-volume", "configMap": {
                         "name": "coredns",
                         "items": [{"key": "Corefile", "path": "Corefile"}]}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {**labels, "kubernetes.io/name": "CoreDNS"},
                      "annotations": {"prometheus.io/port": "9153",
                                      "prometheus.io/scrape": "true"}},
         "spec": {"clusterIP": DNS_IP, "selector": labels, "ports": ports}},
    ]  # fmt: skip


def apply_objects(objs: list[dict[str, Any]]) -> None:
    kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-",
        stdin="\n---\n".join(yaml.safe_dump(o) for o in objs),
    )  # fmt: skip


def deploy_cluster_dns() -> None:
    say("CoreDNS as kube-dns (kubeadm's Corefile, Service at the kubelet's clusterDNS)")
    kubectl("apply", "--server-side", "-f", str(ROOT / "tests" / "data" / "serviceentry-crd.yaml"))
    apply_objects(coredns_manifests())


def deploy_interceptor(restart: bool) -> None:
    say("dns-interceptor: kubectl apply -k deploy/local")
    kubectl("apply", "-k", str(ROOT / "deploy" / "local"))
    if restart:  # a new image under the same tag: the running agent must pick it up
        kubectl("-n", "kube-system", "rollout", "restart", "ds/dns-interceptor")
    kubectl("-n", "kube-system", "rollout", "status", "ds/dns-interceptor", "--timeout=300s",
            timeout=320)  # fmt: skip


# ------------------------------------------------------------------ up / down


def up(cni: str, proxy_mode: str, deploy: bool = True) -> None:
    if os.geteuid() != 0:
        raise ClusterError("make cluster needs root (containerd, kubelet, tc, BPF)")
    t0 = time.monotonic()
    current = (
        (STATE / "cni" / "variant").read_text() if (STATE / "cni" / "variant").exists() else None
    )
    if current is not None and current != cni and pid_of("kubelet") is not None:
        raise ClusterError(f"the cluster runs the {current} CNI: run `make cluster-down` first")
    for d in (STATE, BIN, PIDS, LOGS, RUN):
        d.mkdir(parents=True, exist_ok=True)
    bins = peers()
    (BIN / "kubectl").unlink(missing_ok=True)
    (BIN / "kubectl").symlink_to(bins["kubectl"])
    say("node network: addresses on lo, forwarding, bpffs")
    ensure_host()
    ensure_pki()
    say("control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler")
    start_control_plane(bins)
    write_cni(cni)
    say(f"containerd ({CONTAINERD_SOCK}), CNI {cni}")
    start_containerd()
    imported = images.ensure_all(ctr, bins["coredns"], say)
    start_upstream()
    say("kubelet")
    start_kubelet(bins)
    say(f"kube-proxy ({proxy_mode} mode)")
    start_kube_proxy(bins, proxy_mode)
    deploy_cluster_dns()
    wait_for(
        "CoreDNS to be ready",
        lambda: kubectl("-n", "kube-system", "rollout", "status", "deploy/coredns",
                        "--timeout=5s", check=False, timeout=15).find("successfully") >= 0,
        240,
    )  # fmt: skip
    if deploy:
        deploy_interceptor(restart=images.INTERCEPTOR in imported)
    say(f"cluster up in {time.monotonic() - t0:.0f} s")
    print(f"export KUBECONFIG={KUBECONFIG}")
    print(f"export PATH={BIN}:$PATH")
    print(
        "# then: kubectl run dig --rm -it --restart=Never --image="
        f"{images.CLIENT} -- dig +short kubernetes.default.svc.{CLUSTER_DOMAIN}"
    )


def down() -> None:
    if os.geteuid() != 0:
        raise ClusterError("make cluster-down needs root")
    if not STATE.exists() and not RUN.exists():
        say("no cluster")
        return
    if pid_of("kube-apiserver") is not None and pid_of("kubelet") is not None:
        say("removing the workloads (the agent cleans up after itself on uninstall)")
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            kubectl("delete", "-k", str(ROOT / "deploy" / "local"), "--ignore-not-found",
                    "--wait=true", timeout=60)  # fmt: skip
            _delete_workloads()
    for name in ("kube-proxy", "kubelet", "kube-scheduler", "kube-controller-manager"):
        stop(name)
    say("stopping containers and sandboxes")
    _remove_containers()
    stop("containerd")
    _kill_shims()
    for name in ("kube-apiserver", "etcd", "upstream-dns"):
        stop(name)
    say("cleaning up mounts, network namespaces, rules, pins and state")
    _unmount_under(STATE)
    _unmount_under(RUN)
    kp = CACHE_BIN / f"kube-proxy-{K8S_VERSION}"
    if kp.exists():
        run(kp, "--cleanup", check=False)
    _remove_chains()
    restore_host()
    # An agent that could not take its resolver address away (killed): the addresses its
    # book says it added go, and nothing else on lo.
    book = Path("/run/dns-interceptor/addresses")
    for ip in book.read_text().split() if book.exists() else []:
        run("ip", "addr", "del", ip + ("/128" if ":" in ip else "/32"), "dev", "lo", check=False)
    shutil.rmtree("/sys/fs/bpf/interceptor", ignore_errors=True)
    shutil.rmtree(RUN, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)
    shutil.rmtree("/run/dns-interceptor", ignore_errors=True)
    say("cluster removed")


def _delete_workloads() -> None:
    namespaces = [
        n for n in kubectl("get", "ns", "-o", "name", timeout=20).split()
        if n.split("/")[-1] not in ("kube-system", "kube-public", "kube-node-lease", "default")
    ]  # fmt: skip
    if namespaces:
        kubectl("delete", *namespaces, "--wait=false", check=False, timeout=30)
    kubectl("delete", "deploy,ds,sts,rs", "--all", "-A", "--wait=false", check=False, timeout=30)
    kubectl("delete", "pods", "--all", "-A", "--grace-period=5", "--wait=false", check=False,
            timeout=30)  # fmt: skip
    # Until nothing runs: the kubelet has stopped every sandbox (and so had the CNI tear its
    # network down).  Dead containers wait for the kubelet's garbage collection; ctr removes
    # them below.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = ctr("tasks", "ls", timeout=10, check=False).splitlines()[1:]
        if not [t for t in tasks if "RUNNING" in t]:
            return
        time.sleep(1)


def _remove_containers() -> None:
    if pid_of("containerd") is None:
        return
    for task in ctr("tasks", "ls", "-q", check=False, timeout=20).split():
        ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20)
    time.sleep(1)
    for task in ctr("tasks", "ls", "-q", check=False, timeout=20).split():
        ctr("tasks", "delete", "-f", task, check=False, timeout=20)
    for c in ctr("containers", "ls", "-q", check=False, timeout=20).split():
        ctr("containers", "delete", c, check=False, timeout=20)


def _kill_shims() -> None:
    """containerd's shims outlive it by design; ours name our socket on their command line."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"containerd-shim-runc-v2")
            and str(CONTAINERD_SOCK).encode() in argv
        ):
            stop_pid(int(proc.name), 5)


def _unmount_under(root: Path) -> None:
    prefix = str(root)
    for _ in range(3):
        points = [
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")
        ]  # fmt: skip
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            run("umount", "-l", point, check=False)


def _remove_chains() -> None:
    """What kube-proxy --cleanup leaves: the kubelet's own chains (KUBE-FIREWALL,
    KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT) and portmap's (CNI-*), should a pod with a
    hostPort have run.  Nothing else on this machine uses either prefix."""
    for save, cmd in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        for table in ("nat", "filter", "mangle"):
            dump = run(save, "-t", table, check=False)
            chains = [
                ln[1:].split()[0] for ln in dump.splitlines() if ln.startswith((":CNI-", ":KUBE-"))
            ]
            for rule in dump.splitlines():
                if rule.startswith("-A ") and (" -j CNI-" in rule or " -j KUBE-" in rule):
                    run(cmd, "-t", table, *rule.replace("-A ", "-D ", 1).split(), check=False)
            for chain in chains:
                run(cmd, "-t", table, "-F", chain, check=False)
            for chain in chains:
                run(cmd, "-t", table, "-X", chain, check=False)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def status_quiet() -> bool:
    """Is every component running?"""
    return all(pid_of(n) is not None for n in COMPONENTS)


COMPONENTS = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd",
    "upstream-dns", "kubelet", "kube-proxy",
)  # fmt: skip


def status() -> int:
    running = {n: pid_of(n) for n in (
        "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd",
        "upstream-dns", "kubelet", "kube-proxy")}  # fmt: skip
    for name, pid in running.items():
        print(f"{name:24} {'pid ' + str(pid) if pid else 'not running'}")
    return 0 if all(running.values()) else 1


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    say(f"{label}: {time.monotonic() - t0:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.cluster.node", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="bring the node up (idempotent) with the interceptor deployed")
    # Defaults: what the running cluster has, else $CLUSTER_CNI / $CLUSTER_PROXY_MODE, else
    # ptp and iptables.
    running_cni = _read(STATE / "cni" / "variant") if pid_of("kubelet") else None
    running_mode = _read(STATE / "proxy-mode") if pid_of("kube-proxy") else None
    u.add_argument(
        "--cni", choices=["ptp", "bridge"],
        default=running_cni or os.environ.get("CLUSTER_CNI", "ptp"),
    )  # fmt: skip
    u.add_argument(
        "--proxy-mode", choices=["iptables", "nftables"],
        default=running_mode or os.environ.get("CLUSTER_PROXY_MODE", "iptables"),
    )  # fmt: skip
    u.add_argument("--no-deploy", action="store_true", help="everything but the interceptor")
    sub.add_parser("down", help="remove everything `up` made")
    sub.add_parser("status", help="which components run")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            up(args.cni, args.proxy_mode, deploy=not args.no_deploy)
        elif args.command == "down":
            down()
        else:
            return status()
    except (ClusterError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"\033[31mcluster: {exc}\033[0m", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

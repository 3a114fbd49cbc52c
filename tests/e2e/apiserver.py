"""A real kube-apiserver with a real etcd on loopback, for the e2e tier and benchmarks.

The binaries come from scripts/build-peers.sh (built once per machine from the Go module
proxy).  Data lives in a temporary directory; processes are stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devlab.netns import stop
from tests.helpers import ROOT, free_tcp_ports

ADMIN_TOKEN = "e2e-admin-token"


def peers() -> dict[str, Path]:
    """Build (or find) the pinned peers; their paths by name."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-peers.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.split()
    return {Path(p).name.rsplit("-v", 1)[0]: Path(p) for p in out}


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the apiserver's self-signed cert, on loopback
    return ctx


_TLS = _client_tls()
"""One context for every request: making one loads the system's CA store, which cost more
than the API server's own work when a benchmark posts 70,000 objects."""


@dataclass
class Cluster:
    tmp: Path
    ports: list[int] = field(default_factory=lambda: free_tcp_ports(3))
    etcd: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    bins: dict[str, Path] = field(default_factory=dict)

    @property
    def etcd_port(self) -> int:
        return self.ports[0]

    @property
    def peer_port(self) -> int:
        return self.ports[1]

    @property
    def api_port(self) -> int:
        return self.ports[2]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Cluster:
        self.bins = peers()
        self.tmp.mkdir(parents=True, exist_ok=True)
        key = self.tmp / "sa.key"
        if not key.exists():
            subprocess.run(
                ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
            )
            subprocess.run(
                ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(self.tmp / "sa.pub")],
                check=True,
                capture_output=True,
            )
        (self.tmp / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self.start_etcd()
        self.start_api()
        return self

    def start_etcd(self) -> None:
        self.etcd = subprocess.Popen(
            [
                str(self.bins["etcd"]),
                "--name",
                "e2e",
                "--data-dir",
                str(self.tmp / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster",
                f"e2e=http://127.0.0.1:{self.peer_port}",
                "--log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "etcd.log", "ab"),
        )

    def start_api(self, *extra: str, timeout: float = 90) -> None:
        self.api = subprocess.Popen(
            [
                str(self.bins["kube-apiserver"]),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={self.tmp / 'certs'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                f"--token-auth-file={self.tmp / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={self.tmp / 'sa.pub'}",
                f"--service-account-signing-key-file={self.tmp / 'sa.key'}",
                "--enable-priority-and-fairness=false",
                "-v=0",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "apiserver.log", "ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.raw("GET", "/readyz") == "ok":
                    return
            except (OSError, HttpError):
                pass
            if self.api.poll() is not None:
                raise RuntimeError("kube-apiserver exited:\n" + self.log_tail())
            time.sleep(0.3)
        raise RuntimeError("kube-apiserver not ready:\n" + self.log_tail())

    def etcd_compact(self) -> int:
        """Bump etcd's revision and compact everything before it, as a busy cluster would
        while a client was away: a watch from an older resourceVersion then gets 410 Gone."""
        base = f"http://127.0.0.1:{self.etcd_port}/v3/kv"

        def post(path: str, body: dict[str, Any]) -> Any:
            req = urllib.request.Request(
                f"{base}/{path}", data=json.dumps(body).encode(), method="POST"
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        for i in range(5):
            out = post("put", {"key": "L2UyZS9idW1w", "value": f"{i}".encode().hex()})
        rev = int(out["header"]["revision"])
        post("compaction", {"revision": str(rev), "physical": True})
        return rev

    def log_tail(self) -> str:
        return "\n".join((self.tmp / "apiserver.log").read_text().splitlines()[-20:])

    def stop_api(self) -> None:
        if self.api is not None:
            stop(self.api)
            self.api = None

    def stop(self) -> None:
        self.stop_api()
        if self.etcd is not None:
            stop(self.etcd)
            self.etcd = None

    # ------------------------------------------------------------ HTTP

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str = ADMIN_TOKEN,
        content_type: str = "application/json",
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        for attempt in range(40):
            try:
                with urllib.request.urlopen(req, context=_TLS, timeout=30) as resp:
                    text = resp.read().decode()
                break
            except urllib.error.HTTPError as exc:
                # 429 "storage is (re)initializing": a new CRD or a restarted server.
                if exc.code == 429 and attempt < 39:
                    time.sleep(0.25)
                    continue
                raise HttpError(exc.code, exc.read().decode(errors="replace")) from None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def apply(self, obj: dict[str, Any]) -> Any:
        """Create, or replace if it exists (a tiny kubectl apply)."""
        path = collection_path(obj)
        name = obj["metadata"]["name"]
        try:
            current = self.raw("GET", f"{path}/{name}")
        except HttpError as exc:
            if exc.status != 404:
                raise
            return self.raw("POST", path, obj)
        meta = {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
        return self.raw("PUT", f"{path}/{name}", {**obj, "metadata": meta})

    def delete(self, obj: dict[str, Any]) -> None:
        # Grace period 0: there is no kubelet here to confirm a pod's termination.
        try:
            self.raw(
                "DELETE", f"{collection_path(obj)}/{obj['metadata']['name']}?gracePeriodSeconds=0"
            )
        except HttpError as exc:
            if exc.status != 404:
                raise

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> Any:
        return self.raw(
            "PATCH",
            f"{collection_path(obj)}/{obj['metadata']['name']}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def apply_file(self, path: Path) -> None:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                self.apply(doc)

    def token_for(self, namespace: str, sa: str) -> str:
        req = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }
        out = self.raw("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", req)
        return str(out["status"]["token"])

    def kubeconfig(self, token: str, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "e2e",
                    "clusters": [
                        {
                            "name": "e2e",
                            "cluster": {"server": self.url, "insecure-skip-tls-verify": True},
                        }
                    ],
                    "users": [{"name": "e2e", "user": {"token": token}}],
                    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
                }
            )
        )
        return path


PLURALS = {
    "Namespace": "namespaces",
    "Service": "services",
    "Pod": "pods",
    "EndpointSlice": "endpointslices",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ServiceEntry": "serviceentries",
    "CustomResourceDefinition": "customresourcedefinitions",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def collection_path(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    kind = obj["kind"]
    if kind in CLUSTER_SCOPED:
        return f"{base}/{PLURALS[kind]}"
    ns = obj["metadata"].get("namespace", "default")
    return f"{base}/namespaces/{ns}/{PLURALS[kind]}"


def have_peers() -> bool:
    return shutil.which("go") is not None and os.geteuid() == 0

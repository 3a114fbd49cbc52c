"""The Kubernetes source against a real kube-apiserver and etcd, with the agent's own RBAC
(deploy/base/rbac.yaml) and a ServiceAccount token: every answer checked with dnspython."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.rcode
import pytest

from devlab.netns import stop
from tests.e2e.apiserver import Cluster, HttpError
from tests.helpers import DATA, Served, free_tcp_ports, start_serve

Z = "cluster.local"


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = check()
            if out:
                return out
        except (AssertionError, OSError, dns.exception.DNSException):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s")
        time.sleep(0.05)


def served_path(cluster: Cluster, path: str) -> bool:
    """Whether the API server serves ``path`` yet: a new CRD's path answers 404 until the
    CRD is established."""
    try:
        return cluster.raw("GET", path) is not None
    except HttpError as exc:
        if exc.status == 404:
            return False
        raise


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def a(served: Served, name: str, rtype: str = "A") -> tuple[str, list[str]]:
    m = served.ask(name, rtype)
    return dns.rcode.to_text(m.rcode()), sorted(r.to_text() for rr in m.answer for r in rr)


def svc(name: str, ns: str = "e2e", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80}], **spec},
    }


def slice_(name: str, service: str, ips: list[str], ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "namespace": "e2e",
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


@pytest.fixture(scope="module")
def kubeconfig(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's identity: a token of the deploy/ ServiceAccount, nothing more."""
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "e2e"}})
    token = cluster.token_for("kube-system", "dns-interceptor")
    return cluster.kubeconfig(token, tmp_path_factory.mktemp("kc") / "agent.kubeconfig")


@pytest.fixture(scope="module")
def served(cluster: Cluster, kubeconfig: Path) -> Iterator[Served]:
    os.environ["INTERCEPTOR_CRD_RECHECK"] = "1"
    hp, mp = free_tcp_ports(2)
    s = start_serve(
        "--kubeconfig",
        str(kubeconfig),
        "--upstream",
        "127.0.0.1:9",
        "--health-address",
        f"127.0.0.1:{hp}",
        "--metrics-address",
        f"127.0.0.1:{mp}",
        source=None,
    )
    s.health_port = hp  # type: ignore[attr-defined]
    s.metrics_port = mp  # type: ignore[attr-defined]
    try:
        try:
            eventually(lambda: "service map loaded from the Kubernetes API" in s.log_text(), 30)
        except AssertionError:
            raise AssertionError("no first sync:\n" + s.log_text()) from None
        assert readyz(hp)[0] == 200
        yield s
    finally:
        stop(s.proc)
        os.environ.pop("INTERCEPTOR_CRD_RECHECK", None)


def test_servfail_until_first_sync(tmp_path: Path, cluster: Cluster) -> None:
    # An API server that never answers: cluster names must be SERVFAIL, never NXDOMAIN.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    kc = cluster.kubeconfig("x", tmp_path / "kc")
    kc.write_text(kc.read_text().replace(cluster.url, f"https://127.0.0.1:{port}"))
    (hp,) = free_tcp_ports(1)
    s = start_serve(
        "--kubeconfig",
        str(kc),
        "--upstream",
        "127.0.0.1:9",
        "--health-address",
        f"127.0.0.1:{hp}",
        source=None,
    )
    try:
        for name in (f"kubernetes.default.svc.{Z}", f"nope.e2e.svc.{Z}"):
            assert a(s, name)[0] == "SERVFAIL"
        status, body = readyz(hp)
        assert status == 503 and "not ready: waiting for the first sync" in body
        eventually(lambda: "keeping the last known state" in s.log_text())
        assert s.proc.poll() is None
    finally:
        stop(s.proc)


def test_clusterip_create_update_delete(cluster: Cluster, served: Served) -> None:
    created = cluster.apply(svc("web"))
    ip = created["spec"]["clusterIP"]
    assert eventually(lambda: a(served, f"web.e2e.svc.{Z}") == ("NOERROR", [ip]))
    cluster.apply(svc("web", clusterIP=ip, ports=[{"name": "grpc", "port": 9090}]))
    eventually(
        lambda: (
            a(served, f"_grpc._tcp.web.e2e.svc.{Z}", "SRV")[1] == [f"0 100 9090 web.e2e.svc.{Z}."]
        )
    )
    assert a(served, f"_http._tcp.web.e2e.svc.{Z}", "SRV")[0] == "NXDOMAIN"
    cluster.delete(created)
    eventually(lambda: a(served, f"web.e2e.svc.{Z}")[0] == "NXDOMAIN")


def test_headless_endpoints_turning_ready_and_unready(cluster: Cluster, served: Served) -> None:
    cluster.apply(svc("db", clusterIP="None"))
    cluster.apply(slice_("db-1", "db", ["10.244.9.1", "10.244.9.2"], ready=True))
    eventually(lambda: a(served, f"db.e2e.svc.{Z}") == ("NOERROR", ["10.244.9.1", "10.244.9.2"]))
    cluster.apply(slice_("db-1", "db", ["10.244.9.1", "10.244.9.2"], ready=False))
    eventually(lambda: a(served, f"db.e2e.svc.{Z}")[0] == "NXDOMAIN")
    cluster.apply(slice_("db-1", "db", ["10.244.9.2"], ready=True))
    eventually(lambda: a(served, f"db.e2e.svc.{Z}") == ("NOERROR", ["10.244.9.2"]))


def test_externalname(cluster: Cluster, served: Served) -> None:
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "alias", "namespace": "e2e"},
            "spec": {"type": "ExternalName", "externalName": f"kubernetes.default.svc.{Z}"},
        }
    )
    k8s_ip = cluster.raw("GET", "/api/v1/namespaces/default/services/kubernetes")["spec"][
        "clusterIP"
    ]
    eventually(
        lambda: (
            a(served, f"alias.e2e.svc.{Z}")[1] == sorted([f"kubernetes.default.svc.{Z}.", k8s_ip])
        )
    )


def test_service_entry_lifecycle(cluster: Cluster, served: Served) -> None:
    cluster.apply_file(DATA / "serviceentry-crd.yaml")
    eventually(
        lambda: served_path(cluster, "/apis/networking.istio.io/v1/namespaces/e2e/serviceentries"),
        30,
    )
    se = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "pay", "namespace": "e2e"},
        "spec": {
            "hosts": ["pay.mesh.test"],
            "resolution": "DNS",
            "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
        },
    }
    cluster.apply(se)
    vip = eventually(lambda: a(served, "pay.mesh.test")[1], 30)[0]
    assert vip.startswith("240.240.")
    cluster.patch_status(se, {"addresses": [{"value": "240.240.3.3", "host": "pay.mesh.test"}]})
    eventually(lambda: a(served, "pay.mesh.test")[1] == ["240.240.3.3"])
    cluster.delete(se)
    eventually(lambda: a(served, "pay.mesh.test")[0] == "SERVFAIL")  # forwarded: upstream dead


def test_api_server_restart_keeps_answers_and_relists_without_flapping(
    cluster: Cluster, served: Served
) -> None:
    created = cluster.apply(svc("steady"))
    ip = created["spec"]["clusterIP"]
    eventually(lambda: a(served, f"steady.e2e.svc.{Z}") == ("NOERROR", [ip]))
    bad: list[tuple[str, list[str]]] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            got = a(served, f"steady.e2e.svc.{Z}")
            if got != ("NOERROR", [ip]):
                bad.append(got)
            time.sleep(0.01)

    t = threading.Thread(target=keep_asking)
    t.start()
    try:
        cluster.stop_api()
        # Each resource's watch notices on its own: wait for the Service watch's own failure
        # (another kind's log line can come first, while the Service watch still looks fine).
        eventually(lambda: "watch of Service failed" in served.log_text(), 30)

        def degraded() -> bool:
            status, body = readyz(served.health_port)  # type: ignore[attr-defined]
            return status == 200 and "degraded: the API server is unreachable" in body

        eventually(degraded, 10)
        eventually(
            lambda: (
                'interceptor_kube_api_reachable{resource="Service"} 0.0'
                in metrics(served.metrics_port)  # type: ignore[attr-defined]
            ),
            10,
        )
        text = metrics(served.metrics_port)  # type: ignore[attr-defined]
        assert 'interceptor_kube_synced{resource="Service"} 1.0' in text
        cluster.etcd_compact()  # our last resourceVersion is now compacted away
        cluster.start_api()
        later = cluster.apply(svc("after-restart"))
        eventually(
            lambda: (
                a(served, f"after-restart.e2e.svc.{Z}") == ("NOERROR", [later["spec"]["clusterIP"]])
            ),
            60,
        )
    finally:
        done.set()
        t.join()
        if cluster.api is None:  # failed mid-outage: later tests share this API server
            cluster.start_api()
    assert bad == [], f"answers flapped during the outage and relist: {bad[:5]}"
    assert "410 Gone" in served.log_text()  # the restarted watch cache forced a relist
    text = metrics(served.metrics_port)  # type: ignore[attr-defined]
    assert 'interceptor_kube_api_reachable{resource="Service"} 1.0' in text
    assert "interceptor_kube_watch_errors_total" in text
    assert "interceptor_service_map_answers" in text


def test_missing_permission_is_reported_not_a_crash(cluster: Cluster, tmp_path: Path) -> None:
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "limited", "namespace": "kube-system"},
        }
    )
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "limited"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["namespaces", "services", "pods"],
                    "verbs": ["list", "watch"],
                }
            ],
        }
    )
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "limited"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "limited",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": "kube-system"}],
        }
    )
    kc = cluster.kubeconfig(cluster.token_for("kube-system", "limited"), tmp_path / "kc")
    s = start_serve("--kubeconfig", str(kc), "--upstream", "127.0.0.1:9", source=None)
    try:
        eventually(
            lambda: (
                "RBAC: the agent's ServiceAccount needs list and watch on "
                "/apis/discovery.k8s.io/v1/endpointslices" in s.log_text()
            ),
            30,
        )
        assert a(s, f"kubernetes.default.svc.{Z}")[0] == "SERVFAIL"  # never fully synced
        time.sleep(1)
        assert s.proc.poll() is None and "Traceback" not in s.log_text()
    finally:
        stop(s.proc)

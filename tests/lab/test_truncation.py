"""RFC 2181 section 9 through the BPF path, with a real musl stub resolver (musl 1.2.3, as in
many Alpine images, which never retries over TCP): a headless service too big for 512 bytes
must still resolve, from the whole records that fit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import need
from tests.lab.conftest import Node

ENDPOINTS = 40
NAME = "big.ns1.svc.cluster.local."


def headless(n: int) -> str:
    eps = "\n".join(f"    - {{addresses: [10.1.0.{i + 1}]}}" for i in range(n))
    return (
        "- {apiVersion: v1, kind: Service, metadata: {name: big, namespace: ns1},\n"
        "   spec: {clusterIP: None, ports: [{name: http, port: 80, protocol: TCP}]}}\n"
        "- apiVersion: discovery.k8s.io/v1\n"
        "  kind: EndpointSlice\n"
        "  metadata: {name: big-a, namespace: ns1, labels: {kubernetes.io/service-name: big}}\n"
        "  addressType: IPv4\n"
        "  endpoints:\n" + eps + "\n"
    )


def musl_client(tmp: Path) -> Path:
    cc = need("musl-gcc")
    out = tmp / "getaddrinfo-musl"
    src = Path(__file__).parent / "clients" / "getaddrinfo.c"
    subprocess.run([cc, "-static", "-O2", "-o", str(out), str(src)], check=True)
    return out


def test_musl_resolves_a_headless_service_too_big_for_512_bytes(
    fresh_node: Node, tmp_path: Path
) -> None:
    client = musl_client(tmp_path)
    with fresh_node.source.open("a") as f:
        f.write(headless(ENDPOINTS))
    fresh_node.start_agent()
    r = fresh_node.lab.run_in_pod("client1", str(client), NAME)
    assert r.returncode == 0, r.stderr
    got = int(r.stdout)
    # Whole records up to 512 bytes: (512 - header - question) // 16 bytes per A record.
    assert got == (512 - 12 - (len(NAME) + 1 + 4)) // 16, got
    # The same pod over dig, UDP without EDNS: TC with those records; over TCP: all 40.
    udp = fresh_node.dig("client1", "+noedns", "+ignore", NAME)
    assert "flags: qr aa tc rd ra" in udp, udp
    tcp = fresh_node.answer("client1", "+tcp", NAME)
    assert len(tcp) == ENDPOINTS

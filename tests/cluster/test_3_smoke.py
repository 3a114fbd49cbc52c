"""deploy/smoke-test.sh, unmodified, against the real cluster (no kubectl shim)."""

from __future__ import annotations

import os
import subprocess

from tests.cluster import node
from tests.cluster.conftest import Kube


def test_smoke_test_passes(kube: Kube) -> None:
    env = {
        **os.environ,
        "KUBECTL": f"{node.kubectl_bin()} --kubeconfig={node.KUBECONFIG}",
        "IMAGE": "dns-interceptor:dev",
    }
    r = subprocess.run(
        ["bash", str(node.ROOT / "deploy" / "smoke-test.sh")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "smoke test passed" in r.stdout
    assert "kubernetes.io (forwarded) -> 192.0.2.80" in r.stdout

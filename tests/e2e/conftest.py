from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.apiserver import Cluster
from tests.helpers import ROOT


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver on loopback, with the deploy/ RBAC applied."""
    if os.geteuid() != 0:
        pytest.skip("the e2e tier runs as root (like CI)")
    c = Cluster(Path(tmp_path_factory.mktemp("apiserver"))).start()
    try:
        c.apply_file(ROOT / "deploy" / "base" / "rbac.yaml")
        yield c
    finally:
        c.stop()

"""deploy/ as the tests see it: kustomize renders an overlay, helpers pick the DaemonSet apart
and turn its container into the command line the kubelet would run."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = ("base", "kind", "vagrant", "local")
"""Every kustomization under deploy/ (base and the overlays the scripts apply)."""
PEERS_SCRIPT = ROOT / "scripts" / "build-peers.sh"


def pinned(variable: str) -> str:
    """A version pinned in scripts/build-peers.sh (``KUSTOMIZE_VERSION=v5.8.1``)."""
    m = re.search(rf"^{variable}=(\S+)$", PEERS_SCRIPT.read_text(), re.M)
    assert m, f"{variable} is not set in {PEERS_SCRIPT}"
    return m.group(1)


def kustomize() -> Path:
    """The kustomize binary built by scripts/build-peers.sh; the test skips, saying so, if
    it is absent (`make test` builds it first and fails on any skip)."""
    cache = Path(os.environ.get("INTERCEPTOR_CACHE", "/var/cache/dns-interceptor"))
    path = cache / "bin" / f"kustomize-{pinned('KUSTOMIZE_VERSION')}"
    if not os.access(path, os.X_OK):
        pytest.skip(
            f"{path} is missing: `make peers` (scripts/build-peers.sh) builds it from the "
            "Go module proxy"
        )
    return path


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """``kustomize build deploy/<overlay>`` (or a kustomization directory) as objects."""
    r = subprocess.run(
        [str(kustomize()), "build", str(DEPLOY / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"kustomize build deploy/{overlay} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@dataclass
class AgentSpec:
    """What the kubelet would start for the DaemonSet's agent container."""

    argv: list[str]
    """command + args, with $(VAR) expanded from the container's environment."""
    env: dict[str, str]
    """The container's environment (ConfigMap values and literals; NODE_NAME as given)."""
    capabilities: list[str]
    container: dict[str, Any]
    volumes: dict[str, dict[str, Any]]


def agent_spec(objs: list[dict[str, Any]], node_name: str = "node-1") -> AgentSpec:
    ds = one(objs, "DaemonSet")
    config = one(objs, "ConfigMap")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] == config["metadata"]["name"], f"{var['name']}: unknown ConfigMap"
            assert ref["key"] in config["data"], f"{var['name']}: no key {ref['key']!r}"
            env[var["name"]] = config["data"][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = node_name
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = "dns-interceptor-lab"
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = ds["metadata"]["namespace"]
        else:
            raise AssertionError(f"{var['name']}: unexpected source {source}")

    def expand(arg: str) -> str:
        # The kubelet's rule: $(VAR) becomes the variable's value; unknown ones stay as they
        # are, which the agent would then get literally (so the tests reject them).
        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{arg!r}: $({m.group(1)}) is not in the environment"
            return env[m.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)

    argv = [expand(a) for a in container.get("command", []) + container.get("args", [])]
    caps = container["securityContext"]["capabilities"]
    return AgentSpec(
        argv=argv,
        env=env,
        capabilities=list(caps.get("add", [])),
        container=container,
        volumes={v["name"]: v for v in pod["volumes"]},
    )

"""deploy/: the rendered manifests against the Kubernetes 1.34 OpenAPI schemas and against the
agent's own command line, the kind and Vagrant pieces, the image recipe and the dashboard."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from interceptor.cli import agent_settings_from, build_parser, settings_from
from interceptor.settings import Endpoint
from tests.deploy_manifests import DEPLOY, OVERLAYS, agent_spec, kustomize, one, pinned, render
from tests.helpers import ROOT
from tests.metrics_contract import BY_NAME, TARGET_LABELS, family_of

# kubernetes-validate ships schemas per minor version; 1.34 is the e2e kube-apiserver's.
SCHEMA_VERSION = "1.34.0"
SCRIPTS = [
    DEPLOY / "smoke-test.sh",
    DEPLOY / "kind" / "up.sh",
    DEPLOY / "vagrant" / "provision.sh",
    ROOT / "scripts" / "build-peers.sh",
]
CAPABILITIES = {"NET_ADMIN", "BPF", "PERFMON", "NET_BIND_SERVICE"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def test_kustomize_is_the_pinned_peer() -> None:
    out = subprocess.run([str(kustomize()), "version"], capture_output=True, text=True).stdout
    assert out.strip() == pinned("KUSTOMIZE_VERSION")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_schemas(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[overlay]
    assert sorted(o["kind"] for o in objs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for obj in objs:
        # strict: unknown fields are errors, as the API server's fieldValidation=Strict.
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "kube-system"


def test_the_validator_rejects_what_the_api_server_would(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The schema check can fail: a misspelt field and a wrong type are both caught."""
    ds = one(rendered["base"], "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    typo = {**ds, "spec": {**ds["spec"], "template": {**ds["spec"]["template"]}}}
    typo["spec"]["template"]["spec"] = {**spec, "hostNetwrok": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, SCHEMA_VERSION, strict=True)
    wrong = json.loads(json.dumps(ds))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9253"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, SCHEMA_VERSION, strict=True)


def test_daemonset_runs_the_agent_as_the_issue_asks(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objs = rendered["base"]
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    binding = one(objs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0

    spec = agent_spec(objs)
    c = spec.container
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(spec.capabilities) == CAPABILITIES

    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    host = {p: spec.volumes[m["name"]].get("hostPath", {}).get("path") for p, m in mounts.items()}
    assert host["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert mounts["/sys/fs/bpf"].get("mountPropagation") == "HostToContainer"
    # The image carries its kernel headers: nothing of the node's is mounted for them.
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert not any(a.startswith("--kernel-headers") for a in spec.argv)  # auto
    assert "emptyDir" in spec.volumes[mounts["/tmp"]["name"]]  # writable with a read-only root

    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Its own pod, to follow its DaemonSet (handover on a rollout, clean-up on uninstall),
    # which its Role lets it list and watch, and nothing more.
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    role = one(objs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["list", "watch"]}
    ]
    assert one(objs, "RoleBinding")["subjects"][0]["name"] == pod["serviceAccountName"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9253, "health": 8053}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "health"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemonset_command_is_a_valid_agent_command_line(
    overlay: str,
    rendered: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The container's command, with the kubelet's $(VAR) expansion, parsed by the real CLI:
    a renamed or removed flag fails here, not on a node."""
    spec = agent_spec(rendered[overlay], node_name="node-7")
    assert spec.argv[0] == "interceptor"
    # The kube-dns ConfigMap volume is optional: without the ConfigMap the kubelet mounts an
    # empty directory, which is what the agent reads here.
    mounts = {m["mountPath"]: m["name"] for m in spec.container["volumeMounts"]}
    argv = []
    for arg in spec.argv[1:]:
        if arg.startswith("--kube-dns-config="):
            volume = spec.volumes[mounts[arg.split("=", 1)[1]]]
            assert volume["configMap"] == {"name": "kube-dns", "optional": True}
            arg = f"--kube-dns-config={tmp_path}"
        argv.append(arg)
    for name, value in spec.env.items():  # the container's environment (NODE_NAME ...)
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(argv)
    assert args.command == "agent"
    settings = settings_from(args)
    agent = agent_settings_from(args)
    config = one(rendered[overlay], "ConfigMap")["data"]
    assert agent.captures == (config["CAPTURE"],)
    assert agent.resolver_addresses == (config["RESOLVER_ADDRESS"],)
    assert settings.zone.cluster_domain == config["CLUSTER_DOMAIN"]
    assert settings.zone.pod_records == config["POD_RECORDS"]
    assert settings.metrics == Endpoint("0.0.0.0", 9253)
    assert settings.health == Endpoint("0.0.0.0", 8053)
    assert str(agent.datapath.pin_dir) == "/sys/fs/bpf/interceptor"
    assert agent.node_name == "node-7"  # from $NODE_NAME, the downward API
    assert args.kubeconfig is None and args.source is None  # in-cluster config
    assert settings.upstream.kube_dns is not None  # followed, empty here
    # Each path the agent writes to at run time is a mount, not the read-only root.
    assert str(args.state_dir) in mounts
    assert str(agent.datapath.pin_dir.parent) in mounts


def test_overlays_set_the_image_and_the_cluster_dns_address(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    images = {o: agent_spec(rendered[o]).container["image"] for o in OVERLAYS}
    assert images == {
        "base": "dns-interceptor:0.1.0",
        "kind": "dns-interceptor:dev",
        "vagrant": "dns-interceptor:dev",
        "local": "dns-interceptor:dev",
    }
    capture = {o: one(rendered[o], "ConfigMap")["data"]["CAPTURE"] for o in OVERLAYS}
    assert capture == {
        "base": "10.96.0.10",
        "kind": "10.96.0.10",
        "vagrant": "10.43.0.10",
        "local": "10.96.0.10",
    }
    # Different settings, different ConfigMap names: a change rolls the DaemonSet.
    assert len({one(rendered[o], "ConfigMap")["metadata"]["name"] for o in OVERLAYS}) == 2


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    r = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_kind_config() -> None:
    config = yaml.safe_load((DEPLOY / "kind" / "cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in config["nodes"]]
    assert roles.count("control-plane") == 1 and "worker" in roles
    minor = ".".join(pinned("K8S_VERSION").split(".")[:2])  # v1.34, as the e2e apiserver
    for node in config["nodes"]:
        assert re.fullmatch(rf"kindest/node:{minor}\.\d+@sha256:[0-9a-f]{{64}}", node["image"])
        # The image carries its kernel headers: nothing of the host's is mounted for them.
        assert "extraMounts" not in node
    # kube-dns gets the 10th address of the service range: what deploy/kind captures.
    services = ipaddress.ip_network(config["networking"]["serviceSubnet"])
    capture = render("kind")
    assert str(services[10]) == one(capture, "ConfigMap")["data"]["CAPTURE"]


def test_vagrant_pieces() -> None:
    text = (ROOT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    for path in re.findall(r'path: "([^"]+)"', text):
        assert (ROOT / path).is_file(), path
    provision = (DEPLOY / "vagrant" / "provision.sh").read_text()
    assert "kubectl apply -k deploy/vagrant" in provision
    assert "deploy/smoke-test.sh" in provision
    k3s = re.search(r"^K3S_VERSION=(v\d+\.\d+)\.\d+\+k3s\d+", provision, re.M)
    assert k3s and k3s.group(1) == ".".join(pinned("K8S_VERSION").split(".")[:2])
    # k3s's default service range is 10.43.0.0/16; kube-dns is its 10th address.
    assert str(ipaddress.ip_network("10.43.0.0/16")[10]) == "10.43.0.10"


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
def test_vagrantfile_is_valid_ruby() -> None:
    r = subprocess.run(["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


def test_dockerfile_builds_what_the_daemonset_runs(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert re.fullmatch(r"FROM debian:bookworm(-slim)?", instructions[0])
    assert any("apt-get install" in i and "python3-bpfcc" in i for i in instructions)
    assert any(re.search(r"pip install .*/src", i) for i in instructions)
    copies = [i.split()[1:] for i in instructions if i.startswith("COPY")]
    sources = {s for c in copies for s in c[:-1]}
    assert {"pyproject.toml", "README.md", "interceptor", "bpf"} <= sources
    # The BPF sources land where the loader is told to look.
    bpf_dest = next(c[-1] for c in copies if c[0] == "bpf")
    assert f"INTERCEPTOR_BPF_DIR={bpf_dest}" in text
    assert 'ENTRYPOINT ["interceptor"]' in instructions
    assert agent_spec(rendered["base"]).argv[0] == "interceptor"
    # .dockerignore is an allow-list: everything COPY needs must be let in.
    allowed = {
        ln[1:].rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    }
    assert sources <= allowed, sources - allowed


# ------------------------------------------------------------------ dashboard

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")


def promql_metrics(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, grouping labels) used by a PromQL expression.

    A small lexer is enough for the dashboard's expressions: strings, label matchers,
    ranges and variables are dropped; identifiers followed by ``(`` are functions; what is
    left are metric names."""
    labels = {lab.strip() for _, group in GROUPING.findall(expr) for lab in group.split(",")}
    text = GROUPING.sub(" ", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names, {lab for lab in labels if lab}


def test_promql_lexer_finds_names_and_labels() -> None:
    names, labels = promql_metrics(
        'histogram_quantile(0.99, sum by (le, source) (rate(x_bucket{a="b(c)"}[5m])))'
        " / on (instance) y or vector(0)"
    )
    assert names == {"x_bucket", "y"}
    assert labels == {"le", "source", "instance"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "dashboard.json").read_text())
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


def test_dashboard_uses_only_exported_metrics_and_their_labels() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    used = set()
    for title, expr in exprs:
        if expr.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr).groups()  # type: ignore[union-attr]
            assert metric in BY_NAME and label in TARGET_LABELS | BY_NAME[metric].labels
            used.add(metric)
            continue
        names, grouping = promql_metrics(expr)
        families = []
        for name in names:
            family = family_of(name)
            assert family is not None, f"{title}: {name} is not a metric the agent exports"
            families.append(family)
            used.add(family.name)
        allowed = set(TARGET_LABELS).union(*(f.labels for f in families))
        if any(f.type == "histogram" for f in families):
            allowed.add("le")
        assert grouping <= allowed, f"{title}: grouping by {grouping - allowed}"
        # Every selector is limited to the node variable, so the per-node filter applies.
        for selector in re.findall(r"interceptor_\w+(\{[^}]*\})?", expr):
            assert 'instance=~"$node"' in selector, f"{title}: {expr}"
    # What the issue asks the dashboard to show.
    for needed in (
        "interceptor_requests_total",
        "interceptor_request_duration_seconds",
        "interceptor_cache_hits_total",
        "interceptor_cache_misses_total",
        "interceptor_bpf_events_total",
        "interceptor_bpf_pod_passed_total",
        "interceptor_fastpath_total",
    ):
        assert needed in used, needed


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads((DEPLOY / "dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["node"]["multi"] and variables["node"]["includeAll"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for words in ("by source", "latency percentiles", "cache hit ratio", "fail-open", "per node"):
        assert words in titles, words
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def with_component(tmp: Path, component: str) -> list[dict[str, Any]]:
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "base", tmp)],
                "components": [os.path.relpath(DEPLOY / "components" / component, tmp)],
            }
        )
    )
    return render(tmp)


def test_component_node_kernel_headers(tmp_path: Path) -> None:
    """The opt-in to the node's own headers: both hostPaths, read-only, and the flag."""
    spec = agent_spec(with_component(tmp_path, "node-kernel-headers"))
    mounts = {m["mountPath"]: m for m in spec.container["volumeMounts"]}
    for path in ("/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True
        assert spec.volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert "--kernel-headers=node" in spec.argv


def test_component_for_kernels_5_8_to_5_10(tmp_path: Path) -> None:
    spec = agent_spec(with_component(tmp_path, "kernel-5.8-5.10"))
    assert set(spec.capabilities) == CAPABILITIES | {"SYS_RESOURCE"}

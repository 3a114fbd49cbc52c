"""The rendered deploy/ manifests against a real kube-apiserver (v1.34, as the schemas the unit
tier validates against): every object is server-side applied with ``dryRun=All`` and strict
field validation, so defaulting, validation and admission run, and nothing is stored."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy_manifests import OVERLAYS, one, render
from tests.e2e.apiserver import Cluster, HttpError

MANAGER = "dns-interceptor-e2e"


def resource_path(cluster: Cluster, obj: dict[str, Any]) -> str:
    """The object's URL, from API discovery (no table of plurals to keep up to date)."""
    api = obj["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    found = [
        r
        for r in cluster.raw("GET", base)["resources"]
        if r["kind"] == obj["kind"] and "/" not in r["name"]
    ]
    assert found, f"the API server does not serve {obj['kind']} in {api}"
    res = found[0]
    meta = obj["metadata"]
    if res["namespaced"]:
        return f"{base}/namespaces/{meta['namespace']}/{res['name']}/{meta['name']}"
    return f"{base}/{res['name']}/{meta['name']}"


def dry_run_apply(cluster: Cluster, obj: dict[str, Any]) -> dict[str, Any]:
    """``kubectl apply --server-side --dry-run=server --validate=strict`` for one object."""
    out = cluster.raw(
        "PATCH",
        resource_path(cluster, obj)
        + f"?dryRun=All&fieldManager={MANAGER}&fieldValidation=Strict&force=true",
        obj,
        content_type="application/apply-patch+yaml",
    )
    assert isinstance(out, dict), out
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_server_accepts_every_rendered_object(cluster: Cluster, overlay: str) -> None:
    objs = render(overlay)
    for obj in objs:
        try:
            out = dry_run_apply(cluster, obj)
        except HttpError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc}") from None
        assert out["kind"] == obj["kind"]
        assert out["metadata"]["name"] == obj["metadata"]["name"]
    # The API server kept what matters in the DaemonSet (nothing dropped or rewritten).
    ds = dry_run_apply(cluster, one(objs, "DaemonSet"))
    pod = ds["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    want = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["capabilities"] == want["capabilities"]
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    # Dry run: nothing was stored.
    with pytest.raises(HttpError) as missing:
        cluster.raw("GET", resource_path(cluster, one(objs, "DaemonSet")))
    assert missing.value.status == 404


def test_api_server_rejects_a_broken_daemonset(cluster: Cluster) -> None:
    """The same request fails for an object the API server must refuse, so acceptance above
    means something: an unknown field (strict validation) and an invalid value."""
    ds = one(render("base"), "DaemonSet")
    typo = copy.deepcopy(ds)
    typo["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(HttpError) as exc:
        dry_run_apply(cluster, typo)
    # Server-side apply reports a field outside the schema as 500 "failed to create typed
    # patch object ... field not declared in schema" (1.34), not as a 4xx.
    assert exc.value.status >= 400 and "hostNetwrok: field not declared" in str(exc.value)
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = ""
    with pytest.raises(HttpError) as exc:
        dry_run_apply(cluster, bad)
    assert exc.value.status == 422

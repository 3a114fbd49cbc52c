from __future__ import annotations

from pathlib import Path

import pytest

from interceptor.errors import ObjectError, SourceError
from interceptor.model.objects import parse
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import ZoneSettings
from interceptor.sources.yamlfile import FileSource, load_text


def test_bad_field_names_object_and_field() -> None:
    with pytest.raises(ObjectError) as e:
        parse(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x", "namespace": "n"},
                "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": "eighty"}]},
            }
        )
    assert str(e.value) == (
        "invalid Kubernetes object: Service n/x: field spec.ports[0].port: "
        "expected an integer, got a string 'eighty'"
    )


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"clusterIP": "300.1.1.1"},
            },
            "spec.clusterIPs",
        ),
        ({"apiVersion": "v1", "kind": "Service"}, "metadata.name"),
        ({"apiVersion": "v2", "kind": "Service", "metadata": {"name": "x"}}, "apiVersion"),
        (
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "e"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["x"]}],
            },
            "endpoints[0].addresses",
        ),
        (
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": "s"},
                "spec": {"hosts": []},
            },
            "spec.hosts",
        ),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": []}, "spec"),
    ],
)
def test_errors_name_the_field(obj: dict[str, object], field: str) -> None:
    with pytest.raises(ObjectError) as e:
        parse(obj)
    assert e.value.field == field


def test_yaml_syntax_error_has_a_line_number() -> None:
    with pytest.raises(SourceError) as e:
        load_text("kind: List\nitems: [\n  - {a: b\n", "f.yaml")
    assert "f.yaml: not valid YAML at line" in str(e.value)


def test_bad_object_is_skipped_others_kept() -> None:
    text = """
apiVersion: v1
kind: Service
metadata: {name: good, namespace: n}
spec: {clusterIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: n}
spec: {clusterIP: nope}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
"""
    loaded = load_text(text, "t")
    assert [o.key for o in loaded.objects] == [("Service", "n", "good")]
    assert len(loaded.errors) == 1 and "Service n/bad" in str(loaded.errors[0])
    assert loaded.skipped == {"Deployment": 1}


def test_reload_keeps_last_good_state_on_broken_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: n}\n"
        "spec: {clusterIP: 10.0.0.1}\n"
    )
    m = ServiceMap(ZoneSettings())
    src = FileSource(f, m)
    src.load()
    assert ("Service", "n", "a") in m.objects
    f.write_text("{{{ not yaml")
    assert src.reload_if_changed() is False
    assert ("Service", "n", "a") in m.objects
    f.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: n}\n"
        "spec: {clusterIP: 10.0.0.2}\n"
    )
    assert src.reload_if_changed() is True
    assert set(m.objects) == {("Service", "n", "b")}


YAML_FEATURES = """\
apiVersion: v1
kind: Namespace
metadata: {name: n}
---
apiVersion: v1
defaults: &port {name: http, port: 80, protocol: TCP}
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: n, labels: {"yes": yes, num: 0x10, when: 2024-01-01}}
  spec:
    clusterIP: 10.0.0.1
    ports:
    - <<: *port
      name: web
- &svc {apiVersion: v1, kind: Service, metadata: {name: b, namespace: n},
        spec: {clusterIP: "10.0.0.2", ports: [*port]}}
- *svc
---
kind: ServiceList
items: []
"""


@pytest.mark.parametrize(
    "text",
    [
        YAML_FEATURES,
        *(p.read_text() for p in sorted(Path(__file__).parents[1].glob("data/*.yaml"))),
        (Path(__file__).parents[2] / "interceptor" / "example" / "cluster.yaml").read_text(),
    ],
)
def test_streamed_objects_are_what_the_safe_loader_reads(text: str) -> None:
    """The file source builds objects from parser events, one at a time; they must be the
    objects PyYAML's safe loader would give, anchors, aliases and merge keys included."""
    import yaml

    from interceptor.sources.yamlfile import KINDS, LIST_KINDS

    expected = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        items = doc["items"] if doc.get("kind") in LIST_KINDS else [doc]
        expected += [parse(raw) for raw in items if raw.get("kind") in KINDS]
    loaded = load_text(text, "t.yaml")
    assert loaded.objects == expected and not loaded.errors

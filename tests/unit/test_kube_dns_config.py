"""The kube-dns ConfigMap: both forms (a YAML file, a mounted volume directory), the JSON
inside, clear errors for bad content, and how it combines with the flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptor.errors import ConfigError
from interceptor.settings import (
    Endpoint,
    KubeDnsConfig,
    UpstreamSettings,
    forwarding,
    load_kube_dns_config,
    resolv_conf_search,
)

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: kube-dns, namespace: kube-system}
data:
  stubDomains: |
    {"acme.local": ["1.2.3.4"], "Corp.Example.": ["10.0.0.1:5353", "[fd00::1]:53"]}
  upstreamNameservers: |
    ["8.8.8.8", "8.8.4.4"]
"""


def test_configmap_yaml(tmp_path: Path) -> None:
    path = tmp_path / "kube-dns.yaml"
    path.write_text(CONFIGMAP)
    cfg = load_kube_dns_config(path)
    assert cfg.zones == (
        ("acme.local", (Endpoint("1.2.3.4", 53),)),
        ("corp.example", (Endpoint("10.0.0.1", 5353), Endpoint("fd00::1", 53))),
    )
    assert cfg.servers == (Endpoint("8.8.8.8", 53), Endpoint("8.8.4.4", 53))


def test_mounted_directory(tmp_path: Path) -> None:
    # What a ConfigMap volume looks like: the keys are symlinks into ..data.
    data = tmp_path / "..2024_01_01"
    data.mkdir()
    (data / "stubDomains").write_text('{"acme.local": ["1.2.3.4"]}')
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "stubDomains").symlink_to("..data/stubDomains")
    cfg = load_kube_dns_config(tmp_path)
    assert cfg == KubeDnsConfig((("acme.local", (Endpoint("1.2.3.4", 53),)),), ())


def test_empty_and_absent_keys(tmp_path: Path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\ndata:\n  stubDomains: ''\n")
    assert load_kube_dns_config(path) == KubeDnsConfig()
    path.write_text("apiVersion: v1\nkind: ConfigMap\n")
    assert load_kube_dns_config(path) == KubeDnsConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("stubDomains: '{\"a\": [1.2.3.4]}'", "stubDomains: not valid JSON"),
        ("stubDomains: '[\"1.2.3.4\"]'", "expected a JSON object"),
        ('stubDomains: \'{"a": "1.2.3.4"}\'', "expected a list"),
        ('stubDomains: \'{"a": ["dns.example"]}\'', "'dns.example' is not an IP address"),
        ("stubDomains: '{\"a\": []}'", "the list is empty"),
        ("upstreamNameservers: '[\"1.1.1.1:99999\"]'", "out of range"),
        (
            'upstreamNameservers: \'["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]\'',
            "at most 3",
        ),
        ("upstreamNameservers: ['8.8.8.8']", "expected a JSON string"),
    ],
)
def test_bad_content_is_a_config_error(tmp_path: Path, data: str, message: str) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text(f"apiVersion: v1\nkind: ConfigMap\ndata:\n  {data}\n")
    with pytest.raises(ConfigError) as info:
        load_kube_dns_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_not_a_configmap(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    for text, message in (
        ("kind: Service\n", "expected kind ConfigMap"),
        ("- a\n- b\n", "expected a ConfigMap"),
        ("data: [1, 2]\n", "expected a ConfigMap"),
        ("a: [\n", "not valid YAML"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_kube_dns_config(path)
    with pytest.raises(ConfigError, match="No such file"):
        load_kube_dns_config(tmp_path / "missing.yaml")


def test_flags_win_over_the_configmap() -> None:
    cfg = KubeDnsConfig(
        (("acme.local", (Endpoint("1.2.3.4", 53),)), ("b.local", (Endpoint("1.2.3.5", 53),))),
        (Endpoint("8.8.8.8", 53),),
    )
    flags = UpstreamSettings(zones=(("acme.local", (Endpoint("9.9.9.9", 53),)),))
    zones, servers = forwarding(flags, cfg)
    assert dict(zones) == {
        "acme.local": (Endpoint("9.9.9.9", 53),),
        "b.local": (Endpoint("1.2.3.5", 53),),
    }
    assert servers == (Endpoint("8.8.8.8", 53),)
    own = UpstreamSettings(servers=(Endpoint("10.0.0.53", 53),))
    assert forwarding(own, cfg)[1] == (Endpoint("10.0.0.53", 53),)
    assert forwarding(own, None) == ((), (Endpoint("10.0.0.53", 53),))


def test_resolv_conf_search(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("domain old.test\nnameserver 10.0.0.2\nsearch Corp.Test. lab.test\n")
    assert resolv_conf_search(path) == ("corp.test", "lab.test")
    assert resolv_conf_search(tmp_path / "missing") == ()

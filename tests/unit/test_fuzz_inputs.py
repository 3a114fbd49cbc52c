"""Fuzzing the inputs that come from outside: Kubernetes objects (mutated JSON through the
watch decoder), the YAML source and the kube-dns ConfigMap.  Whatever arrives, the result is
an object or a clear error of ours naming what is wrong, never a traceback.  Seeded, so a
failure reproduces; ``FUZZ_ROUNDS`` runs more."""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from interceptor.errors import ConfigError, ObjectError, SourceError
from interceptor.model.objects import parse
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import ZoneSettings, load_kube_dns_config
from interceptor.sources.kube import decode
from interceptor.sources.yamlfile import load_text
from tests.helpers import DATA

ROUNDS = int(os.environ.get("FUZZ_ROUNDS", "3000"))
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 2**63, 1.5, float("nan"), "", "x" * 300, "\x00", "ü.例え",
    [], [None], {}, {"a": None}, "10.0.0.1", "::1", "not-an-ip", 65536, "80",
]  # fmt: skip


def samples() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DATA / "cluster.yaml").read_text())
    return [item for item in doc["items"] if isinstance(item, dict)]


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def mutate(obj: dict[str, Any], rng: random.Random) -> Any:
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 4)):
        where = rng.choice(paths(obj))
        if not where:
            return copy.deepcopy(rng.choice(ODD_VALUES))
        parent: Any = obj
        for step in where[:-1]:
            parent = parent[step]
        key = where[-1]
        action = rng.random()
        if action < 0.3 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.5 and isinstance(parent[key], list):
            parent[key] = parent[key] * rng.randint(0, 50)
        else:
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return obj


def test_mutated_objects_parse_or_fail_with_a_named_error() -> None:
    rng = random.Random(53)
    smap = ServiceMap(ZoneSettings())
    bases = samples()
    errors = 0
    for _ in range(ROUNDS):
        raw = mutate(rng.choice(bases), rng)
        # Through JSON, as the watch delivers it (NaN and friends as JSON allows them).
        raw = json.loads(json.dumps(raw, default=str))
        if isinstance(raw, dict):
            kind, api = str(raw.get("kind", "Service")), str(raw.get("apiVersion", "v1"))
            got = decode(kind, api, raw)  # the watch path: None and a log line when bad
            if got is not None:
                smap.upsert(got)  # and the map takes whatever parsed
        try:
            parse(raw)
        except ObjectError as exc:
            errors += 1
            assert str(exc).strip() and "Traceback" not in str(exc)
    assert errors > ROUNDS // 10  # the mutations do reach the checks


def test_mutated_yaml_loads_or_fails_with_a_line_number() -> None:
    rng = random.Random(54)
    text = (DATA / "cluster.yaml").read_text()
    for _ in range(ROUNDS // 3):
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            op = rng.random()
            if op < 0.4:
                b[i] = rng.choice(b":-{}[]#&*!|>'\"%@` \n\t\x00abc0")
            elif op < 0.7:
                del b[i : i + rng.randint(1, 40)]
            else:
                b[i:i] = b[rng.randrange(len(b)) :][: rng.randint(1, 40)]
        mutated = b.decode("utf-8", errors="replace")
        try:
            loaded = load_text(mutated, "fuzz.yaml")
        except SourceError as exc:
            assert "fuzz.yaml" in str(exc), exc
            continue
        for err in loaded.errors:
            assert isinstance(err, ObjectError) and str(err).strip()


@pytest.mark.parametrize("seed", range(3))
def test_mutated_kube_dns_configmaps_fail_with_a_config_error(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    good = {
        "stubDomains": {"corp.example": ["10.1.0.10", "10.1.0.11:5353"]},
        "upstreamNameservers": ["8.8.8.8"],
    }
    for i in range(ROUNDS // 30):
        data = mutate({k: json.dumps(v) if rng.random() < 0.7 else v for k, v in good.items()}, rng)
        doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-dns"}}
        if isinstance(data, dict):
            doc["data"] = data
        path = tmp_path / f"cm{i}.yaml"
        path.write_text(yaml.safe_dump(doc) if rng.random() < 0.9 else "data: [\n")
        try:
            load_kube_dns_config(path)
        except ConfigError as exc:
            assert str(exc).strip()

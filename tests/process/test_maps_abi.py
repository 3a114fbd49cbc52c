"""The ctypes mirrors in interceptor/datapath/maps.py must match bpf/lib/maps.h exactly: this
compiles the header with the host compiler and compares every size and field offset."""

from __future__ import annotations

import ctypes as ct
import shutil
import subprocess
from pathlib import Path

import pytest

from interceptor.datapath import maps
from tests.helpers import ROOT


def c_layout(tmp: Path) -> dict[str, int]:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "lib/maps.h"',
        "int main(void) {",
    ]
    for cname, mirror in maps.MIRRORS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in mirror._fields_:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    lines.append("return 0; }")
    src = tmp / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp / "abi"
    subprocess.run(["cc", "-I", str(ROOT / "bpf"), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (ln.split() for ln in out.splitlines())}


def test_mirrors_match_maps_h(tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    c = c_layout(tmp_path)
    for cname, mirror in maps.MIRRORS.items():
        assert ct.sizeof(mirror) == c[cname], f"sizeof(struct {cname})"
        for fname, *_ in mirror._fields_:
            assert getattr(mirror, fname).offset == c[f"{cname}.{fname}"], f"{cname}.{fname}"


def test_reason_names_match_metrics_h() -> None:
    text = (ROOT / "bpf" / "lib" / "metrics.h").read_text()
    for i, name in enumerate(maps.REASONS):
        assert f"REASON_{name.upper()} = {i}," in text
    assert f"REASON_MAX = {len(maps.REASONS)}," in text


def test_fastpath_constants_match_maps_h() -> None:
    text = (ROOT / "bpf" / "lib" / "maps.h").read_text()
    for i, name in enumerate(maps.FASTPATH_RESULTS):
        assert f"FP_{name.upper()} = {i}," in text
    assert f"FP_RESULT_MAX = {len(maps.FASTPATH_RESULTS)}," in text
    assert f"#define FP_NAME_MAX {maps.FP_NAME_MAX} " in text
    assert f"#define FP_BODY_MAX {maps.FP_BODY_MAX} " in text

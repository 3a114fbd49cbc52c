"""The ctypes mirrors of the kernel's struct bpf_prog_info and bpf_map_info must match the
system's linux/bpf.h: compiled with the host compiler, every size and offset compared."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from interceptor.datapath.introspect import KERNEL_MIRRORS


def test_kernel_info_mirrors_match_linux_bpf_h(tmp_path: Path) -> None:
    if shutil.which("cc") is None or not Path("/usr/include/linux/bpf.h").exists():
        pytest.skip("no C compiler or no linux/bpf.h")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/bpf.h>",
        "int main(void) {",
    ]
    for cname, mirror in KERNEL_MIRRORS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in mirror._fields_:
            if not fname.startswith("_"):  # padding is unnamed in C
                lines.append(
                    f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));'
                )
    lines.append("return 0; }")
    (tmp_path / "abi.c").write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "abi"), str(tmp_path / "abi.c")], check=True)
    out = subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True)
    c = {k: int(v) for k, v in (ln.split() for ln in out.stdout.splitlines())}
    for cname, mirror in KERNEL_MIRRORS.items():
        assert ctypes.sizeof(mirror) == c[cname], f"sizeof(struct {cname})"
        for fname, *_ in mirror._fields_:
            if not fname.startswith("_"):
                assert getattr(mirror, fname).offset == c[f"{cname}.{fname}"], f"{cname}.{fname}"

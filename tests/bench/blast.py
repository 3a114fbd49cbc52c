"""dnsblast (tests/bench/dnsblast.c), built on first use and cached by its source's hash.

A test tool, compiled with the system's C compiler (gcc or clang, both Debian packages the
setup installs): the product itself stays Python and BPF C."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from tests.bench.common import BenchError
from tests.bench.nodelocal import CACHE

SOURCE = Path(__file__).with_name("dnsblast.c")


def blast_binary() -> Path:
    """The compiled client; built into $INTERCEPTOR_CACHE/bin when the source changed."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = CACHE / "bin" / f"dnsblast-{digest}"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise BenchError("no C compiler to build tests/bench/dnsblast.c (apt install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    r = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-lpthread", "-lm"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise BenchError(f"building dnsblast failed: {r.stderr.strip()[-800:]}")
    tmp.replace(out)
    return out

"""Compile bpf/redirect.c, load its programs and pin them with its maps, in a short-lived child.

bcc compiles with LLVM inside the calling process, and libbcc, LLVM and what the compile
allocated stay in that process's memory for as long as it lives: about 100 MiB that the
agent, which runs for weeks, would carry for nothing.  So the agent runs this module as a
child (``python -m interceptor.datapath.build``, settings as JSON on stdin).  The child
compiles, loads the two programs, pins the maps (carrying over what the previous agent's
pinned maps hold) and the programs, prints what it did as one JSON line and exits; the
agent then opens the pins with plain bpf(2) calls (:mod:`interceptor.datapath.bpfsys`).
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from interceptor.datapath import kheaders, maps
from interceptor.datapath.bpfsys import (
    copy_entries,
    pin_replacing,
    pinned_map_shape,
)
from interceptor.errors import InterceptorError

log = logging.getLogger(__name__)

PROG_FROM_POD = "dnsi_from_pod"
PROG_TO_POD = "dnsi_to_pod"
PROGRAMS = (PROG_FROM_POD, PROG_TO_POD)
PROG_DIR = "progs"
"""Under the pin directory: the programs' pins (a directory, so map listings skip it)."""

BUILD_TIMEOUT = 300.0
"""Seconds the child may take; a cold compile on a small node takes 2-10."""


class BuildError(InterceptorError):
    """the BPF programs could not be built."""


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What the child needs to know: the build options and where the pins go."""

    pin_dir: str
    fastpath: bool
    fastpath_entries: int
    fastpath_cached: int
    enable_tcp: bool
    enable_ipv6: bool
    kernel_headers: str


@dataclasses.dataclass(frozen=True)
class Built:
    """What the child did."""

    seconds: float
    carried: int
    """Map entries carried over from the previous agent's pins."""
    headers: str
    """Which kernel headers were used (the log line)."""


def bpf_source_dir() -> Path:
    """bpf/ beside the package (a checkout or the image), or INTERCEPTOR_BPF_DIR."""
    env = os.environ.get("INTERCEPTOR_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "bpf"


def cflags(spec: BuildSpec) -> list[str]:
    flags = [f"-I{bpf_source_dir()}"]
    if spec.enable_tcp:
        flags.append("-DENABLE_TCP")
    if spec.enable_ipv6:
        flags.append("-DENABLE_IPV6")
    if spec.fastpath:
        flags += [
            "-DENABLE_FASTPATH",
            f"-DFP_MAX_ENTRIES={spec.fastpath_entries}",
            f"-DFP_CACHED_ENTRIES={max(1, spec.fastpath_cached)}",  # 0: none go down
        ]
    return flags


def prog_pin(pin_dir: Path, name: str) -> Path:
    return pin_dir / PROG_DIR / name


def build(spec: BuildSpec) -> Built:
    """Compile, load and pin (in this process: the child's side; the agent has mounted
    bpffs already)."""
    from bcc import BPF

    pin_dir = Path(spec.pin_dir)
    (pin_dir / PROG_DIR).mkdir(parents=True, exist_ok=True)
    if not spec.fastpath:
        for name, defn in maps.REGISTRY.items():  # a previous run's: not ours to serve now
            if defn.fastpath:
                (pin_dir / name).unlink(missing_ok=True)
    src = bpf_source_dir() / "redirect.c"
    headers = kheaders.apply(spec.kernel_headers)
    t0 = time.monotonic()
    try:
        bpf = BPF(src_file=str(src).encode(), cflags=cflags(spec))
        progs = {n: bpf.load_func(n.encode(), BPF.SCHED_CLS) for n in PROGRAMS}
    except Exception as exc:  # bcc raises bare Exception with the compiler's message
        raise BuildError(f"cannot build {src}: {exc}") from exc
    carried = _pin_maps_carrying_state(bpf, spec, pin_dir)
    for name, prog in progs.items():
        pin_replacing(prog.fd, prog_pin(pin_dir, name))
    return Built(time.monotonic() - t0, carried, headers)


def _pin_maps_carrying_state(bpf: Any, spec: BuildSpec, pin_dir: Path) -> int:
    """Pin the maps bcc just created, after copying into them what the previous agent's
    pinned maps hold (flows, pod counters, answers, the handover grace), so a restart
    loses no state and the programs still attached keep working until replaced.

    bcc could pin them itself, but it reopens existing pins by map id, which needs
    CAP_SYS_ADMIN.  A pin with another layout (another version) is replaced without
    copying: that map's state is lost, not the node's DNS."""
    carried = 0
    for name, defn in maps.REGISTRY.items():
        if defn.fastpath and not spec.fastpath:
            continue
        fd = bpf[name.encode()].map_fd
        path = pin_dir / name
        shape = pinned_map_shape(path)
        entries = defn.entries or max(1, getattr(spec, defn.sized_by))
        want = (ct.sizeof(defn.key), ct.sizeof(defn.value), entries)
        if shape == want:
            carried += copy_entries(path, fd, percpu=defn.percpu)
        elif shape is not None:
            log.warning(
                "pinned map %s has layout %s, this version needs %s: replacing it",
                path,
                shape,
                want,
            )
        pin_replacing(fd, path)
    return carried


def build_in_child(spec: BuildSpec, timeout: float = BUILD_TIMEOUT) -> Built:
    """Run :func:`build` in a child Python; raises BuildError with the child's own message."""
    cmd = [sys.executable, "-m", "interceptor.datapath.build"]
    try:
        done = subprocess.run(
            cmd,
            input=json.dumps(dataclasses.asdict(spec)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"building the BPF programs took more than {timeout:g}s") from exc
    for line in done.stderr.splitlines():
        log.info("build: %s", line)  # the child's warnings (a replaced map layout, say)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise BuildError(last[0])
    try:
        return Built(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as exc:
        raise BuildError(
            f"the build child said something unexpected: {done.stdout!r:.200}"
        ) from exc


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        spec = BuildSpec(**json.loads(sys.stdin.read()))
        built = build(spec)
    except InterceptorError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"bad build settings: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(built)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

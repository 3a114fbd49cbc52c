"""Every image the local cluster runs, built on this machine and imported into containerd's
``k8s.io`` namespace (nothing is pulled: no registry is reachable).

* the base, ``debian:bookworm-slim``: a minbase Debian made by mmdebstrap, imported into
  podman under the name deploy/Dockerfile asks for.  This machine reaches PyPI through a
  TLS-intercepting proxy, so the host's extra CA certificates and pip configuration are
  copied into it (they are the machine's network settings, not the product's);
* the interceptor, built by podman from ``deploy/Dockerfile`` itself, as users build it;
* the sandbox (pause), one static binary compiled from images/pause/pause.c;
* test clients (glibc ``getent``, ``dig``) on the base;
* CoreDNS, the binary scripts/build-peers.sh built, in an empty image.

Each is saved once per content to /var/cache/dns-interceptor/images/<name>-<hash>.tar, so a
warm machine only imports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "images"
CACHE = Path(os.environ.get("INTERCEPTOR_CACHE", "/var/cache/dns-interceptor")) / "images"

BASE = "docker.io/library/debian:bookworm-slim"
INTERCEPTOR = "docker.io/library/dns-interceptor:dev"
PAUSE = "localhost/dnsi/pause:1"
CLIENT = "localhost/dnsi/client:1"
COREDNS = "localhost/dnsi/coredns:v1.14.7"

DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)


def _run(*cmd: str | Path, timeout: float = 1800) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}:\n{(r.stderr or r.stdout)[-3000:]}")


def _digest(paths: Iterable[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _tree(*roots: Path) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        out.extend(root.rglob("*") if root.is_dir() else [root])
    return out


def ensure_base(say: Callable[[str], None]) -> None:
    if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
        return
    say(f"base image {BASE}: mmdebstrap (Debian bookworm, minbase)")
    extra_ca = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    hooks = ['--customize-hook=mkdir -p "$1/usr/local/share/ca-certificates"']
    if extra_ca:
        hooks.append(
            "--customize-hook=copy-in "
            + " ".join(str(p) for p in extra_ca)
            + " /usr/local/share/ca-certificates/"
        )
    if Path("/etc/pip.conf").exists():
        hooks.append("--customize-hook=copy-in /etc/pip.conf /etc/")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "base.tar"
        _run(
            "mmdebstrap", "--variant=minbase", "--quiet",
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*", *hooks, "bookworm", tar,
            *DEBIAN_SOURCES,
        )  # fmt: skip
        _run("podman", "import", "--change", 'CMD ["bash"]', tar, BASE)


def _archive(name: str, digest: str) -> Path:
    return CACHE / f"{name.replace('/', '_').replace(':', '_')}-{digest}.tar"


def _build(name: str, context: Path, containerfile: Path, digest: str) -> Path:
    """podman build + save (docker-archive), once per digest."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = _archive(name, digest)
    if out.exists():
        return out
    _run(
        "podman", "build", "--pull=never", "--network=host", "-f", containerfile, "-t", name,
        context,
    )  # fmt: skip
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _run("podman", "save", "--format", "docker-archive", "-o", tmp, name)
    for old in CACHE.glob(_archive(name, "*").name):
        old.unlink()
    tmp.rename(out)
    return out


def _build_staged(name: str, recipe: Path, digest: str, stage: Callable[[Path], None]) -> Path:
    """An image whose context is made here: ``stage`` fills a scratch directory, next to the
    Containerfile of ``recipe`` (skipped when the archive for ``digest`` exists)."""
    if _archive(name, digest).exists():
        return _archive(name, digest)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp)
        stage(ctx)
        shutil.copy(recipe / "Containerfile", ctx / "Containerfile")
        return _build(name, ctx, ctx / "Containerfile", digest)


def build_interceptor(say: Callable[[str], None]) -> Path:
    digest = _digest(
        _tree(ROOT / "deploy" / "Dockerfile", ROOT / "pyproject.toml", ROOT / "README.md",
              ROOT / "interceptor", ROOT / "bpf", ROOT / ".dockerignore")
    )  # fmt: skip
    say(f"image {INTERCEPTOR}: podman build -f deploy/Dockerfile (inputs {digest})")
    return _build(INTERCEPTOR, ROOT, ROOT / "deploy" / "Dockerfile", digest)


def build_pause(say: Callable[[str], None]) -> Path:
    say(f"image {PAUSE}: static pause binary")
    recipe = HERE / "pause"
    return _build_staged(
        PAUSE,
        recipe,
        _digest(_tree(recipe)),
        lambda ctx: _run("gcc", "-static", "-O2", "-o", ctx / "pause", recipe / "pause.c"),
    )


def build_client(say: Callable[[str], None]) -> Path:
    digest = _digest(_tree(HERE / "client"))
    say(f"image {CLIENT}: getent and dig on Debian")
    return _build(CLIENT, HERE / "client", HERE / "client" / "Containerfile", digest)


def build_coredns(say: Callable[[str], None], binary: Path) -> Path:
    say(f"image {COREDNS}: the CoreDNS binary built from the Go module proxy")
    recipe = HERE / "coredns"
    return _build_staged(
        COREDNS,
        recipe,
        _digest(_tree(recipe), extra=binary.name),
        lambda ctx: shutil.copy(binary, ctx / "coredns"),
    )


def ensure_all(ctr: Callable[..., str], coredns_bin: Path, say: Callable[[str], None]) -> set[str]:
    """Build what is missing, import what containerd lacks; returns the names imported."""
    ensure_base(say)
    archives = {
        PAUSE: build_pause(say),
        CLIENT: build_client(say),
        COREDNS: build_coredns(say, coredns_bin),
        INTERCEPTOR: build_interceptor(say),
    }
    have = set(ctr("images", "ls", "-q", timeout=30).split())
    imported: set[str] = set()
    for name, tar in archives.items():
        labels = ctr("images", "ls", f"name=={name}", timeout=30)
        if name in have and tar.name in labels:
            continue
        say(f"importing {name} into containerd")
        ctr("images", "import", str(tar), timeout=900)
        # Remember which archive the image came from, so a changed one is imported again.
        ctr("images", "label", name, f"dnsi.archive={tar.name}", timeout=30)
        imported.add(name)
    return imported

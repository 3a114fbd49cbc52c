"""Which kernel headers bcc compiles the programs against.

The programs use only stable UAPI structs and helpers (docs/kernel.md), so any recent
kernel's headers compile them for any kernel that has the features.  The agent image carries
Debian's (``$INTERCEPTOR_KERNEL_HEADERS``), so a node needs none of its own; a node's own
headers, where an operator mounts them, match its kernel exactly.

Modes (``agent --kernel-headers``):

* ``auto``: the node's ``/lib/modules/$(uname -r)/build`` when it is complete, else the
  image's, else bcc's own fallback (``/sys/kernel/kheaders.tar.xz``, CONFIG_IKHEADERS);
* ``node``: the node's, or a clear error;
* ``bundled``: the image's, or a clear error;
* a directory: that tree.

bcc reads ``BCC_KERNEL_SOURCE`` when it compiles, so the choice is made by setting it.
"""

from __future__ import annotations

import os
from pathlib import Path

from interceptor.errors import ConfigError

BUNDLED_ENV = "INTERCEPTOR_KERNEL_HEADERS"
BCC_ENV = "BCC_KERNEL_SOURCE"
MODES = ("auto", "node", "bundled")


def _complete(tree: Path) -> bool:
    """A tree bcc can compile against: the source headers and the generated ones."""
    return (tree / "include" / "linux" / "kconfig.h").is_file() and (
        tree / "include" / "generated"
    ).is_dir()


def node_tree(modules: Path = Path("/lib/modules")) -> Path | None:
    """The running kernel's headers as bcc finds them itself, if they are all there.  Debian
    and Ubuntu split them in two (``build``: generated, ``source``: the rest)."""
    base = modules / os.uname().release
    build, source = base / "build", base / "source"
    if (build / "include" / "generated").is_dir() and (
        (source / "include" / "linux" / "kconfig.h").is_file()
        or (build / "include" / "linux" / "kconfig.h").is_file()
    ):
        return build
    return None


def bundled_tree() -> Path | None:
    env = os.environ.get(BUNDLED_ENV)
    if env and _complete(Path(env)):
        return Path(env)
    return None


def choose(mode: str, modules: Path = Path("/lib/modules")) -> tuple[Path | None, str]:
    """(tree for BCC_KERNEL_SOURCE or None to let bcc find the node's, a line for the log)."""
    if mode == "node":
        if node_tree(modules) is None:
            raise ConfigError(
                f"--kernel-headers=node: no complete headers under "
                f"{modules / os.uname().release}/build (mount the node's /lib/modules and "
                f"/usr/src, or use the image's with --kernel-headers=auto)"
            )
        return None, f"the node's kernel headers ({modules / os.uname().release}/build)"
    if mode == "bundled":
        tree = bundled_tree()
        if tree is None:
            raise ConfigError(
                f"--kernel-headers=bundled: ${BUNDLED_ENV} names no complete header tree "
                f"({os.environ.get(BUNDLED_ENV) or 'unset'})"
            )
        return tree, f"the image's kernel headers ({_describe(tree)})"
    if mode == "auto":
        if node_tree(modules) is not None:
            return None, f"the node's kernel headers ({modules / os.uname().release}/build)"
        tree = bundled_tree()
        if tree is not None:
            return tree, f"the image's kernel headers ({_describe(tree)})"
        return None, "no kernel headers found: bcc falls back to /sys/kernel/kheaders.tar.xz"
    tree = Path(mode)
    if not _complete(tree):
        raise ConfigError(
            f"--kernel-headers={mode}: not a complete header tree "
            "(needs include/linux/kconfig.h and include/generated/)"
        )
    return tree, f"kernel headers at {tree}"


def apply(mode: str) -> str:
    """Point bcc at the chosen tree; returns the log line.  An explicit BCC_KERNEL_SOURCE
    in the environment wins, as it does for every bcc tool."""
    if os.environ.get(BCC_ENV):
        return f"kernel headers from ${BCC_ENV} ({os.environ[BCC_ENV]})"
    tree, why = choose(mode)
    if tree is not None:
        os.environ[BCC_ENV] = str(tree)
    return why


def _describe(tree: Path) -> str:
    version = tree / "VERSION"
    if version.is_file():
        return f"{tree}, Linux {version.read_text().strip()}"
    return str(tree)

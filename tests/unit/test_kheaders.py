"""Which kernel headers bcc is pointed at (--kernel-headers), on fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from interceptor.datapath import kheaders
from interceptor.errors import ConfigError


def tree(root: Path, generated: bool = True, source: bool = True) -> Path:
    if source:
        (root / "include" / "linux").mkdir(parents=True)
        (root / "include" / "linux" / "kconfig.h").touch()
    if generated:
        (root / "include" / "generated").mkdir(parents=True)
    return root


def node_modules(tmp: Path) -> Path:
    """Debian's split: build (generated headers) and source (the rest)."""
    base = tmp / "modules" / os.uname().release
    tree(base / "build", source=False)
    tree(base / "source", generated=False)
    return tmp / "modules"


def test_auto_prefers_the_nodes_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kheaders.BUNDLED_ENV, str(tree(tmp_path / "bundled")))
    path, why = kheaders.choose("auto", node_modules(tmp_path))
    assert path is None and "node's" in why


def test_auto_falls_back_to_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tree(tmp_path / "bundled")
    (bundled / "VERSION").write_text("6.1.0-57-amd64\n")
    monkeypatch.setenv(kheaders.BUNDLED_ENV, str(bundled))
    path, why = kheaders.choose("auto", tmp_path / "no-modules")
    assert path == bundled and "Linux 6.1.0-57-amd64" in why


def test_auto_with_nothing_leaves_bcc_its_own_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(kheaders.BUNDLED_ENV, raising=False)
    assert kheaders.choose("auto", tmp_path)[0] is None


def test_an_incomplete_tree_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kheaders.BUNDLED_ENV, str(tree(tmp_path / "b", generated=False)))
    with pytest.raises(ConfigError, match="bundled"):
        kheaders.choose("bundled", tmp_path)
    with pytest.raises(ConfigError, match="not a complete header tree"):
        kheaders.choose(str(tmp_path / "b"), tmp_path)


def test_node_mode_without_node_headers_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--kernel-headers=node"):
        kheaders.choose("node", tmp_path)


def test_apply_sets_bcc_kernel_source_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = tree(tmp_path / "bundled")
    monkeypatch.setenv(kheaders.BUNDLED_ENV, str(bundled))
    # Set, then removed: monkeypatch then restores the variable's original state at the end,
    # including removing what apply() sets (it must not leak into later tests' agents).
    monkeypatch.setenv(kheaders.BCC_ENV, "unset")
    monkeypatch.delenv(kheaders.BCC_ENV)
    kheaders.apply("bundled")
    assert os.environ[kheaders.BCC_ENV] == str(bundled)
    monkeypatch.setenv(kheaders.BCC_ENV, "/elsewhere")
    assert "BCC_KERNEL_SOURCE" in kheaders.apply("bundled")
    assert os.environ[kheaders.BCC_ENV] == "/elsewhere"

"""Importing a few modules of a large package without the package's ``__init__``.

Two of our dependencies import everything they have when the package itself is imported:
``import kubernetes`` imports every generated API and model class (pydantic), and
``import pyroute2`` imports NDB, IPDB, conntrack, WireGuard, nl80211 and the rest.  The agent
uses three modules of the first and one class of the second, and what it imports it holds for
its whole life (about 20 MiB and 6 MiB of RSS).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def bare_packages(*names: str) -> Iterator[dict[str, types.ModuleType]]:
    """While the block runs, the packages ``names`` (a package first, then any subpackages
    of it) stand in ``sys.modules`` as bare packages, so that importing one of their
    submodules does not run their ``__init__``.  Afterwards they are taken away again, and
    a later ``import`` of the package gets the real one; the submodules stay imported.

    Yields the bare packages by name (the block may set attributes that the submodules
    expect of their parent).  Raises ImportError when the first package is not installed
    as a directory.  Packages imported already are left as they are, and not yielded."""
    stubs: dict[str, types.ModuleType] = {}
    try:
        for name in names:
            if name in sys.modules:
                continue
            parent, _, last = name.rpartition(".")
            if parent:
                base = stubs.get(parent) or sys.modules[parent]
                path = [os.path.join(p, last) for p in base.__path__]
            else:
                spec = importlib.util.find_spec(name)
                if spec is None or not spec.submodule_search_locations:
                    raise ImportError(f"{name} is not installed as a package")
                path = list(spec.submodule_search_locations)
            package = types.ModuleType(name)
            package.__path__ = path
            if parent:
                setattr(stubs.get(parent) or sys.modules[parent], last, package)
            stubs[name] = sys.modules[name] = package
        yield stubs
    finally:
        for name, package in stubs.items():
            if sys.modules.get(name) is package:
                del sys.modules[name]

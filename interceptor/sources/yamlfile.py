"""A file of Kubernetes YAML as a source: ``kubectl get ... -o yaml`` output (a ``v1/List``),
multi-document YAML, or both.  The file is re-read when it changes and the difference is
applied, so it can stand in for a live cluster in the demo and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from interceptor.errors import ObjectError, SourceError
from interceptor.model.objects import KINDS, KubeObject, parse
from interceptor.model.servicemap import ServiceMap

log = logging.getLogger(__name__)

LIST_KINDS = {"List"} | {f"{k}List" for k in KINDS}

SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's C loader when PyYAML was built with it (its wheels are): a 100,000-service file
loads in seconds instead of minutes.  The same safe subset of YAML either way."""


@dataclass
class Loaded:
    objects: list[KubeObject] = field(default_factory=list)
    errors: list[ObjectError] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def load_text(text: str, origin: str) -> Loaded:
    """Parse YAML text.  A YAML syntax error raises SourceError; a bad object is reported in
    ``errors`` and skipped, so one typo does not take every other answer away."""
    try:
        docs = list(yaml.load_all(text, Loader=SAFE_LOADER))
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SourceError(f"{origin}: not valid YAML{where}: {problem}") from exc
    out = Loaded()
    for raw in _flatten(docs, origin):
        kind = raw.get("kind")
        if kind not in KINDS:
            out.skipped[str(kind)] = out.skipped.get(str(kind), 0) + 1
            continue
        try:
            out.objects.append(parse(raw))
        except ObjectError as exc:
            out.errors.append(exc)
    return out


def _flatten(docs: list[Any], origin: str) -> Iterator[Mapping[str, Any]]:
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise SourceError(f"{origin}: document {i + 1} is not a mapping")
        if doc.get("kind") in LIST_KINDS and isinstance(doc.get("items"), list):
            for j, item in enumerate(doc["items"]):
                if not isinstance(item, Mapping):
                    raise SourceError(f"{origin}: document {i + 1} items[{j}] is not a mapping")
                yield item
        else:
            yield doc


def load_file(path: Path) -> Loaded:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from exc
    return load_text(text, str(path))


def report(loaded: Loaded, origin: str) -> None:
    for err in loaded.errors:
        log.error("%s: skipped %s", origin, err)
    for kind, n in sorted(loaded.skipped.items()):
        log.info("%s: skipped %d object(s) of unsupported kind %s", origin, n, kind)


class FileSource:
    """Loads a file into a service map and follows changes to it."""

    def __init__(self, path: Path, smap: ServiceMap, poll_interval: float = 1.0) -> None:
        self.path = path
        self.smap = smap
        self.poll_interval = poll_interval
        self._stamp: tuple[int, int] | None = None

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> Loaded:
        """Initial load.  Raises SourceError if the file cannot be read or parsed."""
        self._stamp = self._current_stamp()
        loaded = load_file(self.path)
        report(loaded, str(self.path))
        self.smap.replace(loaded.objects)
        return loaded

    def reload_if_changed(self) -> bool:
        """Apply the file's new contents if it changed.  A broken file keeps the last good
        state and says why."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            loaded = load_file(self.path)
        except SourceError as exc:
            log.error("%s; keeping the previous %d objects", exc, len(self.smap.objects))
            return False
        report(loaded, str(self.path))
        n = self.smap.replace(loaded.objects)
        log.info("%s changed: %d object(s) added, changed or removed", self.path, n)
        return True

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload_if_changed()

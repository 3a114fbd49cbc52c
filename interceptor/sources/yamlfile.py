"""A file of Kubernetes YAML as a source: ``kubectl get ... -o yaml`` output (a ``v1/List``),
multi-document YAML, or both.  The file is re-read when it changes and the difference is
applied, so it can stand in for a live cluster in the demo and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
    ``errors`` and skipped, so one typo does not take every other answer away.

    The text is read as a stream of parser events and each object is built and parsed on its
    own, so a ``v1/List`` of 100,000 items never exists as one tree of YAML nodes: PyYAML's
    loaders compose the whole document first (several hundred bytes of node and mark per
    scalar), which for a large cluster costs minutes and hundreds of megabytes that the
    process never gives back (freed nodes fragment the heap around the live objects)."""
    out = Loaded()

    def take(raw: Mapping[str, Any]) -> KubeObject | ObjectError | str:
        kind = raw.get("kind")
        if kind not in KINDS:
            return str(kind)
        try:
            return parse(raw)
        except ObjectError as exc:
            return exc

    try:
        for got in _objects(text, origin, take):
            if isinstance(got, ObjectError):
                out.errors.append(got)
            elif isinstance(got, str):
                out.skipped[got] = out.skipped.get(got, 0) + 1
            else:
                out.objects.append(got)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SourceError(f"{origin}: not valid YAML{where}: {problem}") from exc
    return out


Taken = TypeVar("Taken")


class _Builder:
    """Python objects from PyYAML parser events, as the safe loader constructs them (the same
    tags, the same implicit types, anchors and aliases), one object at a time."""

    def __init__(self, events: Iterator[Any]) -> None:
        self.events = events
        self.resolver = yaml.resolver.Resolver()
        self.constructor = yaml.constructor.SafeConstructor()
        self.anchors: dict[str, Any] = {}

    def next(self) -> Any:
        return next(self.events)

    def build(self, ev: Any) -> Any:
        if isinstance(ev, yaml.AliasEvent):
            if ev.anchor not in self.anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"found undefined alias {ev.anchor!r}", _mark(ev)
                )
            return self.anchors[ev.anchor]
        if isinstance(ev, yaml.ScalarEvent):
            value = self._scalar(ev)
        elif isinstance(ev, yaml.SequenceStartEvent):
            value = []
            self._anchor(ev, value)
            while not isinstance(item := self.next(), yaml.SequenceEndEvent):
                value.append(self.build(item))
            return value
        elif isinstance(ev, yaml.MappingStartEvent):
            value = {}
            self._anchor(ev, value)
            while not isinstance(key_ev := self.next(), yaml.MappingEndEvent):
                if self.merge_key(key_ev, value):
                    continue
                self.put(value, key_ev, self.build(key_ev), self.build(self.next()))
            return value
        else:
            raise yaml.composer.ComposerError(
                None, None, f"unexpected {type(ev).__name__}", _mark(ev)
            )
        self._anchor(ev, value)
        return value

    @staticmethod
    def put(into: dict[Any, Any], key_ev: Any, key: Any, value: Any) -> None:
        try:
            into[key] = value
        except TypeError as exc:  # an unhashable key: the safe loader refuses it too
            raise yaml.constructor.ConstructorError(
                None, None, f"found unhashable key ({exc})", _mark(key_ev)
            ) from exc

    def merge_key(self, key_ev: Any, into: dict[Any, Any]) -> bool:
        """A merge key (``<<: *base``): the merged mappings' keys that ``into`` lacks so far
        are added (as the safe loader does, later explicit keys still win)."""
        if not (
            isinstance(key_ev, yaml.ScalarEvent) and key_ev.value == "<<" and key_ev.implicit[0]
        ):
            return False
        merged = self.build(self.next())
        for part in merged if isinstance(merged, list) else [merged]:
            if isinstance(part, dict):
                for k, v in part.items():
                    into.setdefault(k, v)
        return True

    def _anchor(self, ev: Any, value: Any) -> None:
        if ev.anchor is not None:
            self.anchors[ev.anchor] = value

    def _scalar(self, ev: Any) -> Any:
        tag = ev.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, ev.value, ev.implicit
            )
        make = self.constructor.yaml_constructors.get(tag)
        if make is None:
            raise yaml.constructor.ConstructorError(
                None, None, f"could not determine a constructor for the tag {tag!r}", ev.start_mark
            )
        return make(self.constructor, yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark))


def _mark(ev: Any) -> Any:
    """An event's start mark (the C parser's own Mark type, which the errors print alike)."""
    return ev.start_mark


def _objects(text: str, origin: str, take: Callable[[Mapping[str, Any]], Taken]) -> Iterator[Taken]:
    """``take`` of every object of the text: of each document, or of each item of a document
    that is a list (``kind: List`` or ``<Kind>List``), built one at a time."""
    b = _Builder(iter(yaml.parse(text, Loader=SAFE_LOADER)))
    index = 0
    while True:
        ev = b.next()
        if isinstance(ev, yaml.StreamEndEvent):
            return
        if not isinstance(ev, yaml.DocumentStartEvent):
            continue
        index += 1
        b.anchors.clear()
        root = b.next()
        if isinstance(root, yaml.MappingStartEvent):
            yield from _document(b, root, index, origin, take)
        else:
            doc = b.build(root)
            if doc is not None:
                raise SourceError(f"{origin}: document {index} is not a mapping")
        b.next()  # DocumentEndEvent


def _document(
    b: _Builder,
    start: Any,
    index: int,
    origin: str,
    take: Callable[[Mapping[str, Any]], Taken],
) -> Iterator[Taken]:
    """One top-level mapping.  Each of its ``items`` is taken as soon as it is built, so only
    what ``take`` keeps of it stays (kubectl writes ``kind`` after ``items``, so the
    document is known to be a list only at its end); then those results are given, or the
    document's own if it is not a list."""
    doc: dict[Any, Any] = {}
    b._anchor(start, doc)
    taken: list[Taken] = []
    not_mapping: int | None = None
    while not isinstance(key_ev := b.next(), yaml.MappingEndEvent):
        if b.merge_key(key_ev, doc):
            continue
        key = b.build(key_ev)
        value_ev = b.next()
        if key == "items" and isinstance(value_ev, yaml.SequenceStartEvent) and not taken:
            j = 0
            while not isinstance(item_ev := b.next(), yaml.SequenceEndEvent):
                item = b.build(item_ev)
                if isinstance(item, Mapping):
                    taken.append(take(item))
                elif not_mapping is None:
                    not_mapping = j
                j += 1
            doc[key] = []  # what a document that is not a list keeps of it: none of our kinds
        else:
            b.put(doc, key_ev, key, b.build(value_ev))
    if doc.get("kind") in LIST_KINDS and "items" in doc:
        if not_mapping is not None:
            raise SourceError(f"{origin}: document {index} items[{not_mapping}] is not a mapping")
        yield from taken
    else:
        yield take(doc)


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

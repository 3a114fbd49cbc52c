"""What the kernel says about BPF objects: programs, maps and their contents, through bpf(2).

This is the read side used by the inspection CLI and the metrics collector.  It needs no
compiler, no bcc program object and no running agent: maps are opened from their pins (or by
id), programs by id, exactly as bpftool does (``BPF_PROG_GET_NEXT_ID``,
``BPF_OBJ_GET_INFO_BY_FD``, ``BPF_MAP_GET_NEXT_KEY`` ...).  Values come back as raw bytes;
decoding them is the job of the layer above, which knows the structs.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from interceptor.datapath.bpfsys import BpfError, MapInfo, bpf_syscall, possible_cpus

# bpf(2) commands (enum bpf_cmd in uapi/linux/bpf.h).
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_F_RDONLY = 1 << 3
"""file_flags/open_flags: read-only access is all inspection needs, and all it should get."""


MAP_TYPES = {
    1: "hash",
    2: "array",
    3: "prog_array",
    4: "perf_event_array",
    5: "percpu_hash",
    6: "percpu_array",
    7: "stack_trace",
    8: "cgroup_array",
    9: "lru_hash",
    10: "lru_percpu_hash",
    11: "lpm_trie",
    12: "array_of_maps",
    13: "hash_of_maps",
    27: "ringbuf",
}
PERCPU_MAP_TYPES = {5, 6, 10}
ARRAY_MAP_TYPES = {2, 6}
PROG_TYPES = {
    1: "socket_filter",
    2: "kprobe",
    3: "sched_cls",
    4: "sched_act",
    5: "tracepoint",
    6: "xdp",
    8: "cgroup_skb",
    26: "tracing",
}

U32, U64 = "=I", "=Q"  # host order, as union bpf_attr

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


class IntrospectError(BpfError):
    """cannot read BPF objects from the kernel."""


class NeedRoot(IntrospectError):
    """permission denied: reading BPF objects needs root (CAP_SYS_ADMIN, or CAP_BPF)."""


class ProgInfo(ct.Structure):
    """The kernel's struct bpf_prog_info (uapi/linux/bpf.h), up to attach_btf_id."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("_gpl_compatible", ct.c_uint32),  # a bitfield in C: bit 0
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32),
        ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64),
        ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32),
        ("nr_line_info", ct.c_uint32),
        ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64),
        ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32),
        ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64),
        ("run_cnt", ct.c_uint64),
        ("recursion_misses", ct.c_uint64),
        ("verified_insns", ct.c_uint32),
        ("attach_btf_obj_id", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


MapInfoFull = MapInfo
"""bpfsys owns the one mirror of struct bpf_map_info."""


KERNEL_MIRRORS: dict[str, type[ct.Structure]] = {
    "bpf_prog_info": ProgInfo,
    "bpf_map_info": MapInfoFull,
}
"""C struct name -> mirror, for the ABI test against the system's linux/bpf.h."""


def _bpf(cmd: int, attr: ct.Array[ct.c_ubyte]) -> int:
    try:
        return bpf_syscall(cmd, attr)
    except BpfError as exc:
        raise IntrospectError(str(exc)) from exc


def _attr() -> ct.Array[ct.c_ubyte]:
    # Every command's attribute is a prefix of union bpf_attr; the unused tail must be zero.
    return (ct.c_ubyte * 128)()


def _put(attr: ct.Array[ct.c_ubyte], offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, attr, offset, value)


def _get_u32(attr: ct.Array[ct.c_ubyte], offset: int) -> int:
    return int(struct.unpack_from(U32, attr, offset)[0])


def _need_root(exc: OSError, what: str) -> IntrospectError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return NeedRoot(what)
    return IntrospectError(f"{what}: {exc.strerror}")


def _next_ids(cmd: int) -> Iterator[int]:
    start = 0
    while True:
        attr = _attr()
        _put(attr, 0, U32, start)
        try:
            _bpf(cmd, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise _need_root(exc, "listing BPF objects") from exc
        start = _get_u32(attr, 4)
        yield start


def prog_ids() -> Iterator[int]:
    """Ids of every loaded program (BPF_PROG_GET_NEXT_ID)."""
    return _next_ids(BPF_PROG_GET_NEXT_ID)


def map_ids() -> Iterator[int]:
    return _next_ids(BPF_MAP_GET_NEXT_ID)


def _fd_by_id(cmd: int, obj_id: int, flags: int = 0) -> int | None:
    attr = _attr()
    _put(attr, 0, U32, obj_id)
    _put(attr, 8, U32, flags)
    try:
        return _bpf(cmd, attr)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None  # unloaded between listing and opening
        raise _need_root(exc, f"opening BPF object {obj_id}") from exc


def _info(fd: int, info: ct.Structure) -> None:
    attr = _attr()
    _put(attr, 0, U32, fd)
    _put(attr, 4, U32, ct.sizeof(info))
    _put(attr, 8, U64, ct.addressof(info))
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError as exc:
        raise _need_root(exc, "BPF_OBJ_GET_INFO_BY_FD") from exc


def boot_time() -> float:
    """Wall-clock time of boot: load_time is in CLOCK_BOOTTIME nanoseconds."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def stats_enabled() -> bool | None:
    """kernel.bpf_stats_enabled: run_cnt/run_time_ns stay 0 unless it is 1.  None: unknown."""
    try:
        return STATS_SYSCTL.read_text().strip() == "1"
    except OSError:
        return None


@dataclass(frozen=True)
class Program:
    id: int
    type: str
    name: str
    tag: str
    loaded_at: float
    """Unix time."""
    uid: int
    run_cnt: int
    run_time_ns: int
    xlated_len: int
    jited_len: int
    verified_insns: int
    map_ids: tuple[int, ...]


def program(prog_id: int) -> Program | None:
    """One program by id, or None if it is gone."""
    fd = _fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
    if fd is None:
        return None
    try:
        ids = (ct.c_uint32 * 64)()
        info = ProgInfo()
        info.nr_map_ids = 64
        info.map_ids = ct.addressof(ids)
        _info(fd, info)
        n = min(info.nr_map_ids, 64)
        return Program(
            id=info.id,
            type=PROG_TYPES.get(info.type, str(info.type)),
            name=info.name.decode(errors="replace"),
            tag=bytes(info.tag).hex(),
            loaded_at=boot_time() + info.load_time / 1e9,
            uid=info.created_by_uid,
            run_cnt=info.run_cnt,
            run_time_ns=info.run_time_ns,
            xlated_len=info.xlated_prog_len,
            jited_len=info.jited_prog_len,
            verified_insns=info.verified_insns,
            map_ids=tuple(sorted(ids[i] for i in range(n))),
        )
    finally:
        os.close(fd)


def programs() -> list[Program]:
    out = []
    for pid in prog_ids():
        p = program(pid)
        if p is not None:
            out.append(p)
    return out


@dataclass(frozen=True)
class MapMeta:
    id: int
    type: str
    type_id: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    @property
    def percpu(self) -> bool:
        return self.type_id in PERCPU_MAP_TYPES


def _map_meta(fd: int) -> MapMeta:
    info = MapInfoFull()
    _info(fd, info)
    return MapMeta(
        id=info.id,
        type=MAP_TYPES.get(info.type, str(info.type)),
        type_id=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def obj_get(path: Path, read_only: bool = True) -> int:
    """An fd for a pinned object (BPF_OBJ_GET)."""
    raw = ct.create_string_buffer(os.fsencode(path))
    attr = _attr()
    _put(attr, 0, U64, ct.addressof(raw))
    _put(attr, 12, U32, BPF_F_RDONLY if read_only else 0)
    try:
        return _bpf(BPF_OBJ_GET, attr)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise IntrospectError(f"no pinned BPF object at {path}") from exc
        raise _need_root(exc, f"opening {path}") from exc


@dataclass
class RawMap:
    """A map opened read-only, its metadata, and its contents as bytes."""

    fd: int
    meta: MapMeta
    path: Path | None = None
    _ncpu: int = field(default=1, repr=False)

    @classmethod
    def pinned(cls, path: Path) -> RawMap:
        fd = obj_get(path)
        try:
            return cls._of(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def by_id(cls, map_id: int) -> RawMap | None:
        fd = _fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id, BPF_F_RDONLY)
        if fd is None:
            return None
        try:
            return cls._of(fd, None)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _of(cls, fd: int, path: Path | None) -> RawMap:
        meta = _map_meta(fd)
        return cls(fd, meta, path, possible_cpus() if meta.percpu else 1)

    def __enter__(self) -> RawMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def ncpu(self) -> int:
        return self._ncpu

    def keys(self) -> Iterator[bytes]:
        """Every key; for arrays, every index.  A hash map changing under us may skip or
        repeat a key (the kernel restarts from the first key when ours was deleted)."""
        ksize = self.meta.key_size
        cur = (ct.c_ubyte * ksize)()
        nxt = (ct.c_ubyte * ksize)()
        first = True
        for _ in range(self.meta.max_entries):
            attr = _attr()
            _put(attr, 0, U32, self.fd)
            _put(attr, 8, U64, 0 if first else ct.addressof(cur))
            _put(attr, 16, U64, ct.addressof(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise IntrospectError(f"iterating map {self.meta.name}: {exc.strerror}") from exc
            first = False
            key = bytes(nxt)
            yield key
            ct.memmove(cur, nxt, ksize)

    def lookup(self, key: bytes) -> list[bytes] | None:
        """The value of ``key``: one element, or one per possible CPU for per-CPU maps
        (the kernel pads each CPU's slot to 8 bytes).  None when the key is absent."""
        stride = (self.meta.value_size + 7) & ~7 if self.meta.percpu else self.meta.value_size
        kbuf = (ct.c_ubyte * len(key)).from_buffer_copy(key)
        vbuf = (ct.c_ubyte * (stride * self._ncpu))()
        attr = _attr()
        _put(attr, 0, U32, self.fd)
        _put(attr, 8, U64, ct.addressof(kbuf))
        _put(attr, 16, U64, ct.addressof(vbuf))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise IntrospectError(f"lookup in map {self.meta.name}: {exc.strerror}") from exc
        raw = bytes(vbuf)
        size = self.meta.value_size
        return [raw[i * stride : i * stride + size] for i in range(self._ncpu)]

    def items(self) -> Iterator[tuple[bytes, list[bytes]]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def count(self) -> int:
        """Entries present (for arrays: every slot exists, so max_entries)."""
        if self.meta.type_id in ARRAY_MAP_TYPES:
            return self.meta.max_entries
        return sum(1 for _ in self.keys())

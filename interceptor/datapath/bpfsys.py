"""Pinned BPF maps through the bpf(2) system call, with the ctypes mirrors.

Used by the agent after loading and by the inspection CLI while the agent is down: neither
needs to compile anything to read a pinned map, and neither loads bcc: libbcc carries LLVM,
which would stay in the long-running agent's memory for nothing (the programs are built
by a short-lived child, see :mod:`interceptor.datapath.build`).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

from interceptor.errors import InterceptorError

K = TypeVar("K", bound=ct.Structure | ct.c_uint32)
V = TypeVar("V", bound=ct.Structure | ct.c_uint64)

BPF_FS_MAGIC = 0xCAFE4A11


class BpfError(InterceptorError):
    """BPF operation failed."""


SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}
"""bpf(2)'s syscall number per machine: for the commands libbcc has no wrapper for."""

_libc = ct.CDLL(None, use_errno=True)


def bpf_syscall(cmd: int, attr: ct.Array[ct.c_ubyte]) -> int:
    """One bpf(2) call; returns the result or raises OSError with the kernel's errno."""
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(f"bpf(2) syscall number unknown on {platform.machine()}")
    rc = int(_libc.syscall(nr, cmd, ct.byref(attr), ct.sizeof(attr)))
    if rc < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 6, 7, 15


class _ElemAttr(ct.Structure):
    """union bpf_attr for the BPF_MAP_*_ELEM commands and BPF_MAP_GET_NEXT_KEY."""

    _fields_ = [
        ("map_fd", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),  # next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ct.c_uint64),
    ]


class _ObjAttr(ct.Structure):
    """union bpf_attr for BPF_OBJ_PIN and BPF_OBJ_GET."""

    _fields_ = [
        ("pathname", ct.c_uint64),
        ("bpf_fd", ct.c_uint32),
        ("file_flags", ct.c_uint32),
        ("path_fd", ct.c_int32),
        ("_pad", ct.c_uint32),
    ]


class _InfoAttr(ct.Structure):
    """union bpf_attr for BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


_NR = SYS_BPF.get(platform.machine(), -1)


def _sys(cmd: int, attr: ct.Structure) -> int:
    """bpf(2) as libbpf's thin wrappers call it: the result, or -1 with errno set."""
    return int(_libc.syscall(_NR, cmd, ct.byref(attr), ct.sizeof(attr)))


def _addr(obj: ct._CData | None) -> int:
    return 0 if obj is None else ct.addressof(obj)


class _Calls:
    """The bpf(2) commands the agent and the CLI use, shaped like libbpf's low-level API
    (0 or a file descriptor on success, -1 with errno set on failure).  Keys and values
    are ctypes objects, passed by address."""

    @staticmethod
    def bpf_obj_get(path: bytes) -> int:
        name = ct.create_string_buffer(path)
        return _sys(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(name)))

    @staticmethod
    def bpf_obj_pin(fd: int, path: bytes) -> int:
        name = ct.create_string_buffer(path)
        return _sys(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(name), bpf_fd=fd))

    @staticmethod
    def bpf_obj_get_info(fd: int, info: ct._CData, size: ct.c_uint32) -> int:
        attr = _InfoAttr(bpf_fd=fd, info_len=size.value, info=ct.addressof(info))
        rc = _sys(BPF_OBJ_GET_INFO_BY_FD, attr)
        size.value = attr.info_len
        return rc

    @staticmethod
    def bpf_lookup_elem(fd: int, key: ct._CData, value: ct._CData) -> int:
        return _sys(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))

    @staticmethod
    def bpf_update_elem(fd: int, key: ct._CData, value: ct._CData, flags: int) -> int:
        attr = _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags)
        return _sys(BPF_MAP_UPDATE_ELEM, attr)

    @staticmethod
    def bpf_delete_elem(fd: int, key: ct._CData) -> int:
        return _sys(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key)))

    @staticmethod
    def bpf_get_next_key(fd: int, key: ct._CData | None, next_key: ct._CData) -> int:
        """The key after ``key`` (the first key when ``key`` is None)."""
        attr = _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(next_key))
        return _sys(BPF_MAP_GET_NEXT_KEY, attr)


lib = _Calls()


class ElemLookup:
    """One map lookup made over and over (the hot path's flow reads): the attribute block,
    the key and the value buffers are built once; a lookup is one system call."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.key = ct.create_string_buffer(key_size)
        self.value = ct.create_string_buffer(value_size)
        self._attr = _ElemAttr(map_fd=fd, key=_addr(self.key), value=_addr(self.value))
        self._ref = ct.byref(self._attr)
        self._size = ct.sizeof(self._attr)
        self._syscall = _libc.syscall

    def __call__(self) -> bool:
        """Look up :attr:`key` into :attr:`value`; False when there is no such key."""
        return int(self._syscall(_NR, BPF_MAP_LOOKUP_ELEM, self._ref, self._size)) == 0


def bpffs_mounted(path: Path = Path("/sys/fs/bpf")) -> bool:
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    return any(
        parts[1] == str(path) and parts[2] == "bpf"
        for parts in (line.split() for line in text.splitlines())
        if len(parts) > 2
    )


def ensure_bpffs(path: Path = Path("/sys/fs/bpf")) -> bool:
    """Mount bpffs at ``path`` if nothing is mounted there.  Returns True if it mounted."""
    if bpffs_mounted(path):
        return False
    libc = ct.CDLL(None, use_errno=True)
    path.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
        err = ct.get_errno()
        raise BpfError(f"cannot mount bpffs at {path}: {os.strerror(err)}")
    return True


def possible_cpus() -> int:
    """Per-CPU map values have one slot per *possible* CPU (not online)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class MapInfo(ct.Structure):
    """The kernel's struct bpf_map_info (uapi/linux/bpf.h); tests/process/test_introspect_abi.py
    checks it against the system's header."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("map_extra", ct.c_uint64),
    ]


def pinned_map_shape(path: Path) -> tuple[int, int, int] | None:
    """(key size, value size, max entries) of a pinned map, or None if there is none."""
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        return None
    try:
        info = map_info(fd)
        if info is None:
            return None
        return info.key_size, info.value_size, info.max_entries
    finally:
        os.close(fd)


def map_info(fd: int) -> MapInfo | None:
    info = MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info(fd, info, size) != 0:
        return None
    return info


def copy_entries(src: Path, dst_fd: int, percpu: bool) -> int:
    """Copy every entry of the map pinned at ``src`` into the map ``dst_fd`` of the same
    shape (raw bytes, per-CPU values whole).  Returns how many entries were copied."""
    fd = lib.bpf_obj_get(str(src).encode())
    if fd < 0:
        return 0
    try:
        info = map_info(fd)
        if info is None:
            return 0
        key_a = (ct.c_ubyte * info.key_size)()
        key_b = (ct.c_ubyte * info.key_size)()
        stride = (info.value_size + 7) & ~7 if percpu else info.value_size
        value = (ct.c_ubyte * (stride * (possible_cpus() if percpu else 1)))()
        copied = 0
        rc = lib.bpf_get_next_key(fd, None, key_b)
        while rc == 0:
            if lib.bpf_lookup_elem(fd, key_b, value) == 0:
                if lib.bpf_update_elem(dst_fd, key_b, value, 0) == 0:
                    copied += 1
            ct.memmove(key_a, key_b, info.key_size)
            rc = lib.bpf_get_next_key(fd, key_a, key_b)
        return copied
    finally:
        os.close(fd)


def pin_replacing(fd: int, path: Path) -> None:
    """Pin ``fd`` at ``path``, replacing whatever is pinned there in one rename, so a reader
    (the inspection CLI) always finds a map."""
    tmp = path.with_name(path.name + "_NEW")  # bpffs refuses names with a dot
    tmp.unlink(missing_ok=True)
    if lib.bpf_obj_pin(fd, str(tmp).encode()) != 0:
        raise BpfError(f"cannot pin {path}: {os.strerror(ct.get_errno() or errno.EIO)}")
    os.replace(tmp, path)


class PinnedMap(Generic[K, V]):
    """A BPF map opened from its pin, with typed keys and values."""

    def __init__(self, path: Path, key: type[K], value: type[V], percpu: bool = False) -> None:
        self.path = path
        self.key_type = key
        self.value_type = value
        self.percpu = percpu
        self.fd = lib.bpf_obj_get(str(path).encode())
        if self.fd < 0:
            raise BpfError(f"cannot open pinned map {path}: {os.strerror(ct.get_errno() or 2)}")
        self._ncpu = possible_cpus() if percpu else 1
        # Kernel rounds each per-CPU value up to 8 bytes.
        self._stride = (ct.sizeof(value) + 7) & ~7

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def get(self, key: K) -> V | None:
        if self.percpu:
            raise TypeError("use get_percpu for per-CPU maps")
        out = self.value_type()
        if lib.bpf_lookup_elem(self.fd, key, out) != 0:
            return None
        return out

    def get_percpu(self, key: K) -> list[V]:
        buf = (ct.c_ubyte * (self._stride * self._ncpu))()
        if lib.bpf_lookup_elem(self.fd, key, buf) != 0:
            return []
        raw = bytes(buf)
        size = ct.sizeof(self.value_type)
        out: list[V] = []
        for cpu in range(self._ncpu):
            start = cpu * self._stride
            out.append(self.value_type.from_buffer_copy(raw[start : start + size]))  # type: ignore[arg-type]
        return out

    def put(self, key: K, value: V) -> None:
        if self.percpu:
            raise TypeError("per-CPU values are written by the programs only")
        if lib.bpf_update_elem(self.fd, key, value, 0) != 0:
            raise BpfError(
                f"update of {self.path.name} failed: {os.strerror(ct.get_errno() or errno.EIO)}"
            )

    def zero_percpu(self, key: K) -> None:
        buf = (ct.c_ubyte * (self._stride * self._ncpu))()
        lib.bpf_update_elem(self.fd, key, buf, 0)

    def delete(self, key: K) -> bool:
        return bool(lib.bpf_delete_elem(self.fd, key) == 0)

    def keys(self) -> Iterator[K]:
        cur = self.key_type()
        nxt = self.key_type()
        first = True
        while True:
            rc = lib.bpf_get_next_key(self.fd, None if first else cur, nxt)
            if rc != 0:
                return
            first = False
            yield self.key_type.from_buffer_copy(nxt)  # type: ignore[misc]
            ct.memmove(ct.byref(cur), ct.byref(nxt), ct.sizeof(nxt))

    def items(self) -> Iterator[tuple[K, V]]:
        for k in list(self.keys()):
            v = self.get(k)
            if v is not None:
                yield k, v

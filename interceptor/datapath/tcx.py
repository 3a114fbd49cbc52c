"""Detect tcx programs (kernel >= 6.6): they run before every cls_bpf filter on the hook,
so a CNI using tcx (newer Cilium) sees pod DNS before we do.  BPF_PROG_QUERY via ctypes."""

from __future__ import annotations

import ctypes as ct
import errno

from interceptor.datapath.bpfsys import BpfError, bpf_syscall

BPF_PROG_QUERY = 16
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47


class _Query(ct.Structure):
    _fields_ = [
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("query_flags", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
        ("prog_ids", ct.c_uint64),
        ("prog_cnt", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("prog_attach_flags", ct.c_uint64),
        ("link_ids", ct.c_uint64),
        ("link_attach_flags", ct.c_uint64),
        ("revision", ct.c_uint64),
    ]


def tcx_programs(ifindex: int) -> dict[str, list[int]] | None:
    """Program ids attached with tcx per direction, or None if the kernel has no tcx."""
    out: dict[str, list[int]] = {}
    for direction, attach in (("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)):
        ids = (ct.c_uint32 * 64)()
        attr = (ct.c_ubyte * 128)()
        q = _Query.from_buffer(attr)
        q.target_ifindex = ifindex
        q.attach_type = attach
        q.prog_ids = ct.addressof(ids)
        q.prog_cnt = 64
        try:
            bpf_syscall(BPF_PROG_QUERY, attr)
        except (OSError, BpfError) as exc:
            if isinstance(exc, BpfError) or exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            out[direction] = []
            continue
        out[direction] = [ids[i] for i in range(min(q.prog_cnt, 64))]
    return out

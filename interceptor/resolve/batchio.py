"""Datagrams in and out by the batch: recvmmsg(2) and sendmmsg(2), called through ctypes.

Python's socket module moves one datagram per system call.  On the hot path, where an
answer costs about a microsecond of Python, the two calls per query cost more than the
answer.  One ``recvmmsg`` takes up to a batch of queries; their hot-path answers leave in
one ``sendmmsg``, each addressed to the very socket-address bytes its query came from, so
nothing is parsed or built per query to send it.

The buffers are allocated once.  The kernel reads and writes them in place, and Python
reads them through memoryviews; only the queries' bytes are copied out.  The layouts
below are Linux's on 64-bit platforms (``struct mmsghdr``: a ``struct msghdr`` and the
message length).
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import socket
from collections.abc import Callable
from typing import cast

SOCKADDR_MAX = 28
"""sizeof(struct sockaddr_in6): room for either family's address."""


class _IoVec(ct.Structure):
    _fields_ = [("base", ct.c_void_p), ("len", ct.c_size_t)]


class _MsgHdr(ct.Structure):
    _fields_ = [
        ("name", ct.c_void_p),
        ("namelen", ct.c_uint32),
        ("iov", ct.c_void_p),
        ("iovlen", ct.c_size_t),
        ("control", ct.c_void_p),
        ("controllen", ct.c_size_t),
        ("flags", ct.c_int),
    ]


class _MMsgHdr(ct.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ct.c_uint)]


# Indexes into a struct mmsghdr seen as 32-bit words (received) or 64-bit words (sent).
_WORDS32 = ct.sizeof(_MMsgHdr) // 4
_NAMELEN32 = _MsgHdr.namelen.offset // 4
_LEN32 = _MMsgHdr.len.offset // 4
_WORDS64 = ct.sizeof(_MMsgHdr) // 8
_NAMELEN64 = _MsgHdr.namelen.offset // 8

_libc: ct.CDLL | None = None


def _load_libc() -> ct.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        lib = ct.CDLL(name, use_errno=True)
        if not hasattr(lib, "recvmmsg") or not hasattr(lib, "sendmmsg"):
            return None
        lib.recvmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int, ct.c_void_p]
        lib.recvmmsg.restype = ct.c_int
        lib.sendmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int]
        lib.sendmmsg.restype = ct.c_int
        _libc = lib
    return _libc


def available() -> bool:
    """Whether this platform has recvmmsg and sendmmsg with the layout assumed here."""
    return ct.sizeof(ct.c_void_p) == 8 and ct.sizeof(_MMsgHdr) == 64 and _load_libc() is not None


Peer = tuple[str, int]
"""A datagram's source as the socket module's recvfrom gives it: (address, port), and for
IPv6 the flow info and scope id after them (typed as the pair that every reader uses)."""


class DatagramBatch:
    """Receives up to ``size`` datagrams of up to ``slot`` bytes with one call, and sends
    replies to them with one call.  Not thread-safe: one per socket, on the loop."""

    def __init__(self, sock: socket.socket, size: int = 64, slot: int = 4096) -> None:
        lib = _load_libc()
        if lib is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg not available")
        self._lib = lib
        self.fd = sock.fileno()
        self.v6 = sock.family == socket.AF_INET6
        self.size = size
        self.slot = slot
        self._in = (ct.c_char * (size * slot))()
        self._names = (ct.c_char * (size * SOCKADDR_MAX))()
        self._in_iov = (_IoVec * size)()
        self._in_msg = (_MMsgHdr * size)()
        self._out = (ct.c_char * (size * slot))()
        self._out_iov = (_IoVec * size)()
        self._out_msg = (_MMsgHdr * size)()
        inbuf, names, outbuf = (ct.addressof(b) for b in (self._in, self._names, self._out))
        for i in range(size):
            self._in_iov[i].base = inbuf + i * slot
            self._in_iov[i].len = slot
            hdr = self._in_msg[i].hdr
            hdr.name = names + i * SOCKADDR_MAX
            hdr.namelen = SOCKADDR_MAX
            hdr.iov = ct.addressof(self._in_iov[i])
            hdr.iovlen = 1
            self._out_iov[i].base = outbuf + i * slot
            out = self._out_msg[i].hdr
            out.iov = ct.addressof(self._out_iov[i])
            out.iovlen = 1
        self._names_base = names
        self._in_view = memoryview(self._in).cast("B")
        self._names_view = memoryview(self._names).cast("B")
        self._in_words = memoryview(self._in_msg).cast("B").cast("I")
        self._out_view = memoryview(self._out).cast("B")
        self._out_words = memoryview(self._out_msg).cast("B").cast("Q")
        self._out_lens = memoryview(self._out_iov).cast("B").cast("Q")
        self._queued = 0
        self._peers: dict[bytes, Peer] = {}

    def receive(self) -> int:
        """Datagrams received into the batch (0: none waiting).  Raises OSError."""
        n = int(self._lib.recvmmsg(self.fd, self._in_msg, self.size, socket.MSG_DONTWAIT, None))
        if n < 0:
            err = ct.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, errno.errorcode.get(err, str(err)))
        # Each address length the kernel wrote back is the family's own size, which is what
        # the next call needs again: a socket receives one family only.
        return n

    def answer(
        self, n: int, fast: Callable[[bytes, Peer], bytes | None]
    ) -> tuple[int, list[tuple[bytes, Peer]], list[tuple[bytes, Peer]]]:
        """Run ``fast`` over the ``n`` datagrams received and queue the replies it gives, to
        go out at :meth:`flush` (before the next :meth:`receive`).  Returns (replies queued,
        the datagrams it did not answer, replies too big for a slot with their peers)."""
        slot = self.slot
        view = self._in_view
        names = self._names_view
        words = self._in_words
        out_view = self._out_view
        out_lens = self._out_lens
        out_words = self._out_words
        peers = self._peers
        names_base = self._names_base
        missed: list[tuple[bytes, Peer]] = []
        big: list[tuple[bytes, Peer]] = []
        k = 0
        for i in range(n):
            w = i * _WORDS32
            start = i * slot
            data = bytes(view[start : start + words[w + _LEN32]])
            namelen = words[w + _NAMELEN32]
            nstart = i * SOCKADDR_MAX
            raw = bytes(names[nstart : nstart + namelen])
            peer = peers.get(raw)
            if peer is None:
                peer = self._peer(raw)
            reply = fast(data, peer)
            if reply is None:
                missed.append((data, peer))
                continue
            size = len(reply)
            if size > slot:
                big.append((reply, peer))
                continue
            out = k * slot
            out_view[out : out + size] = reply
            out_lens[2 * k + 1] = size
            out_words[k * _WORDS64] = names_base + nstart
            out_words[k * _WORDS64 + _NAMELEN64] = namelen
            k += 1
        self._queued = k
        return k, missed, big

    def _peer(self, raw: bytes) -> Peer:
        port = (raw[2] << 8) | raw[3]
        peer: Peer
        if self.v6:
            flow = int.from_bytes(raw[4:8], "big")
            scope = int.from_bytes(raw[24:28], "little")
            peer = cast(Peer, (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope))
        else:
            peer = (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        if len(self._peers) >= 4096:
            self._peers.clear()  # clients' ports change with every socket: keep it small
        self._peers[raw] = peer
        return peer

    def flush(self) -> tuple[int, int]:
        """Send the queued replies: (sent, lost).  Raises nothing: a full send buffer or an
        error costs those replies, as a failed sendto would."""
        queued, self._queued = self._queued, 0
        done = lost = 0
        while done < queued:
            offset = done * ct.sizeof(_MMsgHdr)
            n = int(self._lib.sendmmsg(self.fd, ct.byref(self._out_msg, offset), queued - done, 0))
            if n > 0:
                done += n
                continue
            err = ct.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.ENOBUFS):
                lost += queued - done  # the send buffer is full: the rest would fail too
                break
            # The kernel reports an error only for the first message of what is left (an
            # unreachable peer, say): that one is lost, the rest go on.
            done += 1
            lost += 1
        return queued - lost, lost

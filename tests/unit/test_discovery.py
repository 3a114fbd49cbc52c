"""Which netlink messages wake the agent's link tables."""

from __future__ import annotations

import socket
import struct

from interceptor.datapath.discovery import NDMSG, NLMSG_HEADER, RTATTR, WakeFilter


def msg(kind: int, payload: bytes = b"\0" * 16) -> bytes:
    body = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), kind, 0, 0, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def neigh(kind: int, ifindex: int, ip: str, state: int = 2) -> bytes:
    dst = socket.inet_aton(ip)
    body = NDMSG.pack(socket.AF_INET, 0, 0, ifindex, state, 0, 1)
    body += RTATTR.pack(RTATTR.size + len(dst), 1) + dst
    return msg(kind, body)


def test_link_and_route_changes_wake() -> None:
    for kind in (16, 17, 24, 25):
        assert WakeFilter().wakes(msg(kind))


def test_address_changes_alone_do_not_wake() -> None:
    assert not WakeFilter().wakes(msg(20) + msg(21))  # RTM_NEWADDR, RTM_DELADDR


def test_a_new_neighbour_wakes_once_and_its_state_changes_do_not() -> None:
    f = WakeFilter()
    assert f.wakes(neigh(28, 7, "10.244.1.10"))
    # REACHABLE -> STALE -> DELAY -> PROBE -> REACHABLE: every few seconds for a busy pod.
    for state in (4, 8, 16, 2):
        assert not f.wakes(neigh(28, 7, "10.244.1.10", state))
    assert f.wakes(neigh(28, 8, "10.244.1.10"))  # the same address behind another port
    assert not f.wakes(neigh(29, 7, "10.244.1.10"))  # gone: nothing to attach
    assert f.wakes(neigh(28, 7, "10.244.1.10"))  # and back: news again


def test_a_waking_message_after_others_is_found() -> None:
    assert WakeFilter().wakes(msg(20, b"\0" * 5) + msg(16))
    f = WakeFilter()
    f.wakes(neigh(28, 7, "10.244.1.10"))
    assert f.wakes(neigh(28, 7, "10.244.1.10") + neigh(28, 7, "10.244.1.11"))


def test_truncated_or_bogus_lengths_end_the_walk() -> None:
    assert not WakeFilter().wakes(b"\0" * 8)
    assert not WakeFilter().wakes(struct.pack("=IHHII", 0, 20, 0, 0, 0) + msg(16))
    assert WakeFilter().wakes(msg(28, b"\0" * 3))  # a neighbour we cannot read: look anyway

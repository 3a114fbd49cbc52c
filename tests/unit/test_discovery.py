"""Which netlink messages wake the agent's link tables."""

from __future__ import annotations

import struct

from interceptor.datapath.discovery import NLMSG_HEADER, wakes


def msg(kind: int, payload: bytes = b"\0" * 16) -> bytes:
    body = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), kind, 0, 0, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def test_link_route_and_neighbour_changes_wake() -> None:
    for kind in (16, 17, 24, 25, 28):
        assert wakes(msg(kind))


def test_address_changes_alone_do_not_wake() -> None:
    assert not wakes(msg(20) + msg(21))  # RTM_NEWADDR, RTM_DELADDR


def test_a_waking_message_after_others_is_found() -> None:
    assert wakes(msg(20, b"\0" * 5) + msg(28))


def test_truncated_or_bogus_lengths_end_the_walk() -> None:
    assert not wakes(b"\0" * 8)
    assert not wakes(struct.pack("=IHHII", 0, 20, 0, 0, 0) + msg(16))

"""Send DNS queries from inside a network namespace and report the raw replies.

Run as ``python -m tests.lab.dnsprobe SERVER`` with a JSON list of hex queries on
stdin; prints a JSON list of ``{"reply": hex, "csum_ok": bool}`` (``reply`` None on timeout).
Each reply is also captured off the wire with an AF_PACKET socket, and its IPv4 header and UDP
checksums are recomputed here: a reply built in the kernel must carry correct checksums, even
where the receiving stack would not check them (CHECKSUM_PARTIAL on a veth).
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksums_ok(frame: bytes) -> bool:
    """Are the IP (v4) and UDP checksums of this Ethernet frame right?"""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        ip = frame[14 : 14 + ihl]
        if _sum16(ip) != 0xFFFF:
            return False
        src, dst = ip[12:16], ip[16:20]
        udp = frame[14 + ihl : 14 + struct.unpack_from("!H", ip, 2)[0]]
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
        if struct.unpack_from("!H", udp, 6)[0] == 0:
            return True  # no checksum (IPv4 only)
    else:
        src, dst = frame[22:38], frame[38:54]
        udp = frame[54 : 54 + struct.unpack_from("!H", frame, 18)[0]]
        pseudo = src + dst + struct.pack("!IxxxB", len(udp), 17)
    return _sum16(pseudo + udp) == 0xFFFF


def ask(server: str, queries: list[bytes], timeout: float = 2.0) -> list[dict[str, object]]:
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    out: list[dict[str, object]] = []
    for q in queries:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        port = s.getsockname()[1]
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        try:
            reply, _ = s.recvfrom(65535)
        except TimeoutError:
            out.append({"reply": None, "csum_ok": False})
            s.close()
            continue
        out.append({"reply": reply.hex(), "csum_ok": _captured_ok(cap, port, reply)})
        s.close()
    cap.close()
    return out


def _captured_ok(cap: socket.socket, port: int, reply: bytes) -> bool:
    """Find the reply's frame among those captured (incoming, to our port)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if not select.select([cap], [], [], 0.2)[0]:
            continue
        frame, addr = cap.recvfrom(65535)
        if addr[2] != socket.PACKET_HOST or not frame.endswith(reply):
            continue
        dport_off = (14 + (frame[14] & 0x0F) * 4 if frame[12:14] == b"\x08\x00" else 54) + 2
        if struct.unpack_from("!H", frame, dport_off)[0] == port:
            return checksums_ok(frame)
    return False


def main() -> None:
    queries = [bytes.fromhex(h) for h in json.load(sys.stdin)]
    json.dump(ask(sys.argv[1], queries), sys.stdout)


if __name__ == "__main__":
    main()

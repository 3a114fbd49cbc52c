"""A byte relay between TCP and a Unix socket.  Unix sockets live in the file system, which
network namespaces share: two relays carry the lab node's connections to the API server on
the host's loopback without giving the node namespace any route out.

    python relay.py tcp HOST PORT UNIX_PATH   # listen on TCP, connect to the Unix socket
    python relay.py unix UNIX_PATH HOST PORT  # listen on the Unix socket, connect to TCP
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener: socket.socket, connect: object) -> None:
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        try:
            upstream = connect()  # type: ignore[operator]
        except OSError:
            client.close()
            continue
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()


def main() -> None:
    mode = sys.argv[1]
    if mode == "tcp":
        host, port, path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((host, port))

        def connect() -> socket.socket:
            u = socket.socket(socket.AF_UNIX)
            u.connect(path)
            return u
    else:
        path, host, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if os.path.exists(path):
            os.unlink(path)
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(path)

        def connect() -> socket.socket:
            return socket.create_connection((host, port))

    print("ready", flush=True)
    serve(lst, connect)


def start_relays(netns: str, api_port: int, sock: Path) -> list[subprocess.Popen[str]]:
    """Carry ``127.0.0.1:api_port`` of network namespace ``netns`` to the API server on the
    host's loopback, over the Unix socket ``sock``.  Returns both relays, once both said
    they are ready; raises RuntimeError (after stopping them) if one did not."""
    me = str(Path(__file__).resolve())
    procs: list[subprocess.Popen[str]] = []
    for cmd in (
        [sys.executable, me, "unix", str(sock), "127.0.0.1", str(api_port)],
        [
            "nsenter",
            f"--net=/run/netns/{netns}",
            sys.executable,
            me,
            "tcp",
            "127.0.0.1",
            str(api_port),
            str(sock),
        ],
    ):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            for p in procs:
                p.kill()
                p.wait()
            raise RuntimeError(f"the API relay {' '.join(cmd)} did not start")
    return procs


if __name__ == "__main__":
    main()

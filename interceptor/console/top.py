"""``interceptor top``: per-pod DNS rates from the per-CPU counters, refreshed in place.

Plain ANSI (home + clear) rather than curses: it works over ``kubectl exec -t``, in any
terminal size, and degrades to one frame after another when the output is not a terminal.
``q`` or Ctrl-C quits; the terminal is restored either way.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from interceptor.console.table import render
from interceptor.errors import InterceptorError
from interceptor.ops.counters import COUNTS, CounterReader, Snapshot, rates
from interceptor.ops.state import NodeState, agent_alive, read_state

CLEAR = "\x1b[H\x1b[2J"


# Per-second columns: (counter, header).  "answered" exists when the programs have the
# in-kernel fast path (queries answered without reaching the resolver).
COLUMNS = [
    (c, h)
    for c, h in (
        ("queries", "queries/s"),
        ("redirected", "redir/s"),
        ("answered", "kernel/s"),
        ("passed", "passed/s"),
        ("limited", "limited/s"),
    )
    if c in COUNTS
]


def frame(before: Snapshot, after: Snapshot, state: NodeState | None, interval: float) -> str:
    rs = rates(before, after)
    # limited/s only while some pod is over its budget: the table keeps to 80 columns, and a
    # limited pod stands out when it appears.
    columns = [(c, h) for c, h in COLUMNS if c != "limited" or any(r.rate(c) > 0 for r in rs)]
    rows = [
        (
            r.pod.pod,
            ",".join(r.pod.ifnames),
            *(round(r.rate(c), 1) for c, _ in columns),
            r.pod.count("queries"),
        )
        for r in rs
    ]
    total = sum(r.rate("queries") for r in rs)
    agent = "agent running" if agent_alive(state) else "AGENT NOT RUNNING"
    head = (
        f"interceptor top: {len(rows)} pods, {total:.1f} q/s, {agent}, "
        f"every {interval:g}s, {time.strftime('%H:%M:%S')}"
    )
    table = render(
        ["pod", "iface", *(h for _, h in columns), "queries"],
        rows,
        sort=False,  # busiest first, as rates() orders them
    )
    return f"{head}\n\n{table if rows else 'no pods'}"


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[bool]:
    """cbreak mode on a terminal so a single ``q`` is read at once; yields whether it is one."""
    if not stream.isatty():
        yield False
        return
    import termios
    import tty

    fd = stream.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _wait(seconds: float, interactive: bool) -> bool:
    """Sleep ``seconds``; True if the user asked to quit."""
    if not interactive:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"):
            return True
    return False


def run_top(
    pin_path: Path,
    state_dir: Path,
    interval: float,
    once: bool = False,
    count: int | None = None,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    if interval <= 0:
        raise InterceptorError("--interval must be positive")
    frames = 1 if once else count
    if frames is not None and frames < 1:
        raise InterceptorError("--count must be at least 1")
    live = frames is None and out.isatty()
    state = read_state(state_dir)
    with CounterReader(pin_path, lambda: state) as reader:
        before = reader.read()
        shown = 0
        try:
            with _keys(sys.stdin) if live else contextlib.nullcontext(False) as interactive:
                while frames is None or shown < frames:
                    if _wait(interval, bool(interactive)):
                        break
                    state = read_state(state_dir)  # pods come and go while we watch
                    after = reader.read()
                    text = frame(before, after, state, interval)
                    before = after
                    if live:
                        out.write(CLEAR + text + "\n")
                    else:
                        out.write(("\n" if shown else "") + text + "\n")
                    out.flush()
                    shown += 1
        except KeyboardInterrupt:
            pass
    return 0

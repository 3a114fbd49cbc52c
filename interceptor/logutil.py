"""Logging helpers: a rate limiter so that a flood of bad packets costs one line, not millions."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs each *cause* at most once per ``interval`` seconds, with a count of what it held back.

    Keyed by cause (a short stable string such as ``"formerr"``), never by peer, so a hostile
    client cannot make the key space itself grow without bound.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, cause: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return
        held = self._suppressed.pop(cause, 0)
        self._last[cause] = now
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        self._logger.log(level, msg, *args)

    def warning(self, cause: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, cause, msg, *args)

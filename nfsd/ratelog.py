"""The one helper for log lines a client can cause per request (refused connections, garbage arguments,
refused mounts, accept errors): a flood of requests must not become a flood of log (STYLE.md rule 14).

Each message template may be written ``burst`` times per ``interval`` seconds; the rest are counted, and the
next line written for that template says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time

from nfsd.limits import DEFAULT


class RateLimitedLog:
    def __init__(self, burst: int = DEFAULT.log_burst, interval: float = DEFAULT.log_interval) -> None:
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list] = {}  # (logger, template) -> [window start, written, dropped]

    def configure(self, burst: int, interval: float) -> None:
        self.burst, self.interval = burst, interval

    def log(
        self, logger: logging.Logger, level: int, msg: str, *args: object, exc_info: bool | BaseException = False
    ) -> bool:
        """Log ``msg % args`` unless its template was written ``burst`` times this interval; True if written."""
        if not logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        key = (logger.name, msg)
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w[0] >= self.interval:
                dropped = w[2] if w else 0
                if len(self._windows) >= 1024:  # templates are few; this only guards against misuse
                    self._windows.clear()
                w = self._windows[key] = [now, 0, dropped]
            if w[1] >= self.burst:
                w[2] += 1
                return False
            w[1] += 1
            dropped, w[2] = w[2], 0
        if dropped:
            logger.log(level, msg + " (and %d more like it not logged)", *args, dropped, exc_info=exc_info)
        else:
            logger.log(level, msg, *args, exc_info=exc_info)
        return True


limited = RateLimitedLog()

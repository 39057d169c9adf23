"""The event loop the servers run on: uvloop (libuv, written in C) where it is installed, asyncio's own otherwise.

Every NFS call crosses the loop several times (the socket's readiness, the send of its reply, a worker thread's
result), so the loop's own cost is part of every call; uvloop's is lower. ``BOOTBACK_EVENT_LOOP=asyncio`` keeps
the standard loop (to compare, or to rule uvloop out when chasing a problem). The code never depends on which.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default (not installed, or not wanted)."""
    if os.environ.get("BOOTBACK_EVENT_LOOP", "uvloop").lower() == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return uvloop.new_event_loop


# A thread waiting for the GIL gets it after at most this long. The loop thread answers every call while worker
# threads decode chunks and copy data; at Python's default 5 ms a heartbeat GETATTR behind them waited up to
# several of those (p99 54 ms under cold load, 28 ms at 0.5 ms, other figures unchanged: docs/benchmarks.md).
SWITCH_INTERVAL = 0.0005


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks, with the loop thread's GIL waits kept short."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)

"""The event loop the servers run on: uvloop (libuv, written in C) where it is installed, asyncio's own otherwise.

Every NFS call crosses the loop several times (the socket's readiness, the send of its reply, a worker thread's
result), so the loop's own cost is part of every call; uvloop's is lower. ``BOOTBACK_EVENT_LOOP=asyncio`` keeps
the standard loop (to compare, or to rule uvloop out when chasing a problem). The code never depends on which.
"""

from __future__ import annotations

import asyncio
import os
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


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)

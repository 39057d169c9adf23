"""The one wait of the disposable servers (PostgreSQL, MariaDB): until the server answers, it exits, or the
time is up. A server that exits says why in its own words (its log's FATAL/[ERROR] line); one that is still not
ready at the deadline is stopped, so no server outlives the command that started it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from appliance.errors import ItemRecoveryError

POLL = 0.1  # seconds between checks: a check is one client connection


def wait_until_ready(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    name: str,
    where: str,
    failure: Callable[[], str],
    stop: Callable[[], None],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ItemRecoveryError(f"{name} could not start on the copy of {where}: {failure()}")
        if ready():
            return
        if time.monotonic() > deadline:
            stop()
            raise ItemRecoveryError(f"{name} did not become ready within {timeout:.0f} s on {where}")
        time.sleep(POLL)

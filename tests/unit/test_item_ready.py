"""The one wait-until-ready loop of the disposable servers (PostgreSQL, MariaDB), with real processes."""

from __future__ import annotations

import subprocess
import time

import pytest

from appliance.errors import ItemRecoveryError
from appliance.items.ready import wait_until_ready


def test_returns_once_the_check_says_ready() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    asked = []
    try:
        wait_until_ready(proc, lambda: asked.append(1) or len(asked) == 3, "Srv", "/x", lambda: "", proc.kill, 5)
        assert len(asked) == 3 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_exits_is_reported_with_its_own_reason() -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 3"])
    proc.wait()
    with pytest.raises(ItemRecoveryError, match=r"^Srv could not start on the copy of /data: FATAL: bad$"):
        wait_until_ready(proc, lambda: False, "Srv", "/data", lambda: "FATAL: bad", proc.kill, 5)


def test_a_server_never_ready_is_stopped_at_the_timeout() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    start = time.monotonic()
    with pytest.raises(ItemRecoveryError, match=r"^Srv did not become ready within 0 s on /data$"):
        wait_until_ready(proc, lambda: False, "Srv", "/data", lambda: "", proc.kill, 0.3)
    assert time.monotonic() - start < 3
    assert proc.wait(timeout=5) != 0  # stopped by the loop

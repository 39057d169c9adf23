"""The servers' event loop: uvloop where installed (it is a dependency), asyncio's when asked for."""

from __future__ import annotations

import asyncio
import sys

import pytest

from nfsd import eventloop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_servers_run_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOTBACK_EVENT_LOOP", raising=False)
    assert eventloop.run(loop_module()).startswith("uvloop")


def test_bootback_event_loop_asyncio_keeps_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTBACK_EVENT_LOOP", "asyncio")
    assert eventloop.run(loop_module()).startswith("asyncio")


def test_the_servers_keep_gil_waits_short() -> None:
    async def interval() -> float:
        return sys.getswitchinterval()

    before = sys.getswitchinterval()
    try:
        assert eventloop.run(interval()) == eventloop.SWITCH_INTERVAL < 0.005
    finally:
        sys.setswitchinterval(before)

"""``nfsd.rpc.start_eagerly``: a call runs at once on the event loop until it first waits; one that never
waits needs no Task, one that waits carries on as a Task with results, errors and cancellation intact."""

from __future__ import annotations

import asyncio

import pytest

from nfsd.rpc import start_eagerly


def run(coro_fn):  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def test_a_call_that_never_waits_finishes_before_start_eagerly_returns() -> None:
    done: list[str] = []

    async def call() -> None:
        done.append("answered")

    async def scenario() -> None:
        assert start_eagerly(call()) is None
        assert done == ["answered"]  # no trip through the loop

    run(scenario)


def test_a_call_that_waits_goes_on_as_a_task_with_values_and_errors() -> None:
    seen: list[object] = []

    async def call(first: asyncio.Future, second: asyncio.Future) -> None:
        seen.append("started")
        seen.append(await first)
        await asyncio.sleep(0)  # a bare yield, as the loop's own primitives do
        try:
            await second
        except ValueError as exc:
            seen.append(f"error {exc}")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        task = start_eagerly(call(first, second))
        assert isinstance(task, asyncio.Task) and seen == ["started"]
        first.set_result(42)
        await asyncio.sleep(0.01)
        assert seen == ["started", 42] and not task.done()
        second.set_exception(ValueError("boom"))
        await asyncio.wait_for(task, 2)
        assert seen == ["started", 42, "error boom"]

    run(scenario)


def test_cancelling_the_task_reaches_the_call() -> None:
    cleaned: list[bool] = []

    async def call(never: asyncio.Future) -> None:
        try:
            await never
        finally:
            cleaned.append(True)

    async def scenario() -> None:
        task = start_eagerly(call(asyncio.get_running_loop().create_future()))
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    run(scenario)

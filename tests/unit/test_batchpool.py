"""The write pool hands results back in batches: every call gets its own result or exception, in any number."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nfsd.batchpool import BatchPool


def test_results_and_exceptions_reach_their_callers() -> None:
    pool = BatchPool(workers=2, name="t")
    threads: set[str] = set()

    def work(i: int) -> int:
        threads.add(threading.current_thread().name)
        if i % 7 == 3:
            raise ValueError(f"bad {i}")
        return i * i

    async def main() -> list:
        futs = [pool.submit(lambda i=i: work(i)) for i in range(500)]
        return await asyncio.gather(*futs, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        pool.shutdown()
    for i, r in enumerate(results):
        if i % 7 == 3:
            assert isinstance(r, ValueError) and str(r) == f"bad {i}"
        else:
            assert r == i * i
    assert threads <= {"t-0", "t-1"} and threads


def test_a_cancelled_caller_does_not_break_the_others() -> None:
    pool = BatchPool(workers=1, name="c")
    gate = threading.Event()

    async def main() -> int:
        slow = pool.submit(lambda: gate.wait(5))
        doomed = pool.submit(lambda: 1)
        fine = pool.submit(lambda: 2)
        doomed.cancel()
        gate.set()
        await slow
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await fine

    try:
        assert asyncio.run(main()) == 2
    finally:
        pool.shutdown()

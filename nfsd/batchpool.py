"""A worker thread that hands results back to the event loop in batches.

``run_in_executor`` wakes the event loop once per finished call (a write to its self-pipe); under a queue of
sixteen WRITEs that is sixteen wake-ups for work that takes microseconds each. Here a worker drains whatever is
queued, runs it, and delivers all results with one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BatchPool:
    def __init__(self, workers: int = 2, name: str = "batch") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((loop, fut, fn))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < 64:  # take what else is waiting, without blocking
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done: dict[asyncio.AbstractEventLoop, list] = {}
            for entry in batch:
                if entry is _STOP:
                    self._deliver(done)
                    return
                loop, fut, fn = entry
                try:
                    outcome = (True, fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    outcome = (False, exc)
                done.setdefault(loop, []).append((fut, outcome))
            self._deliver(done)

    @staticmethod
    def _deliver(done: dict) -> None:
        for loop, results in done.items():
            try:
                loop.call_soon_threadsafe(_settle, results)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)


def _settle(results: list) -> None:
    for fut, (ok, value) in results:
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

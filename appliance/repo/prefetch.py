"""Warming a published disk's read cache in the background (``publish --prefetch``).

The VM runs from the first second, its reads fetch what they touch; meanwhile a prefetch fetches every other
stored chunk, several at once, into the read cache, so that after a while the whole disk is local (and stays
readable while the repository's endpoint is away). It goes around the in-memory chunk cache, which must keep
what the VM is using, skips what is already hydrated, stops when the read cache's budget is spent or the
session stops, and never fails the session: a chunk it cannot fetch is counted and left for the VM's own read
to report.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from appliance.errors import BootbackError
from appliance.repo.reader import DiskReader

log = logging.getLogger("bootback.prefetch")
WORKERS = 8  # requests in flight per disk: ~8 x 1 MiB keeps a single RGW or an S3 region busy


class Prefetch:
    def __init__(self, reader: DiskReader, workers: int = WORKERS) -> None:
        if reader.hydrated is None:
            raise ValueError("prefetch needs a reader with a read cache")  # a caller's bug: checked by publish
        self.reader = reader
        self.workers = workers
        self.todo = [i for i, cid in enumerate(reader.disk.chunks) if cid is not None]
        self.done = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prefetch-{reader.disk.name}", daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        slots = threading.Semaphore(2 * self.workers)  # bounded: at most this many chunks in memory at once
        with ThreadPoolExecutor(self.workers, thread_name_prefix="prefetch") as pool:
            for index in self.todo:
                if self._stop.is_set() or self._budget_spent():
                    break
                slots.acquire()
                pool.submit(self._one, index).add_done_callback(lambda _f: slots.release())
        log.info("prefetch of %s: %s", self.reader.disk.name, self.status())

    def _budget_spent(self) -> bool:
        cache = self.reader.hydrated.cache
        return cache.used + self.reader.chunk_size > cache.budget

    def _one(self, index: int) -> None:
        if self._stop.is_set():
            return
        try:
            self.reader.hydrate(index)
            self.done += 1
        except BootbackError as exc:
            self.failed += 1
            log.warning("prefetch of %s: %s", self.reader.disk.name, exc)

    def stop(self, timeout: float | None = 30) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict:
        return {"disk": self.reader.disk.name, "chunks": len(self.todo), "done": self.done, "failed": self.failed}


def rewarm(readers: list[DiskReader], current: list[Prefetch] | None) -> list[Prefetch]:
    """The warm-ups of a session asked to prefetch (the page's button, ``POST /sessions/ID/prefetch``): the
    current ones while any still runs (one warm-up per disk at a time, however often it is asked), else new ones,
    which skip whatever is hydrated already."""
    if current and any(w.running for w in current):
        return current
    return [Prefetch(r).start() for r in readers]

"""Warming a published disk's read cache in the background (``publish --prefetch``).

The VM runs from the first second, its reads fetch what they touch; meanwhile a prefetch fetches every other
stored chunk, several at once (a packed repository on a remote store: runs of a pack by one ranged read
each, as a restore reads them), into the read cache, so that after a while the whole disk is local (and stays
readable while the repository's endpoint is away). It goes around the in-memory chunk cache, which must keep
what the VM is using, skips what is already hydrated, stops when the read cache's budget is spent or the
session stops, and never fails the session: a chunk it cannot fetch is counted and left for the VM's own read
to report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from appliance.errors import BootbackError
from appliance.repo.packindex import PackRecord
from appliance.repo.reader import SPAN_BYTES, DiskReader

log = logging.getLogger("bootback.prefetch")
WORKERS = 8  # requests in flight per disk: ~8 x 1 MiB keeps a single RGW or an S3 region busy
IN_FLIGHT_BYTES = 4 * SPAN_BYTES  # chunks fetched and not yet stored, at most; also the slice of the disk grouped
# into runs at a time, so no run needs more than all of it (compressible chunks make long runs)


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
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"prefetch-{reader.disk.name}", daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._fetch_all()
        except BootbackError as exc:  # planning needs the indexes: the endpoint may be away; the VM's reads say so
            log.warning("prefetch of %s stopped: %s", self.reader.disk.name, exc)
        log.info("prefetch of %s: %s", self.reader.disk.name, self.status())

    def _fetch_all(self) -> None:
        step = max(1, IN_FLIGHT_BYTES // self.reader.chunk_size)
        slots = threading.Semaphore(step)  # one per chunk in memory
        with ThreadPoolExecutor(self.workers, thread_name_prefix="prefetch") as pool:
            for run in self._runs(step):
                if self._stop.is_set() or self._budget_spent(len(run)):
                    break
                for _ in run:
                    slots.acquire()
                pool.submit(self._one, run).add_done_callback(lambda _f, n=len(run): slots.release(n))

    def _runs(self, step: int) -> Iterator[list[tuple[int, PackRecord | None]]]:
        """The chunks not hydrated yet, ``step`` of the disk's at a time, as runs to fetch (planned a slice at a
        time, so a run never holds more chunks than ``step``); those hydrated already count as done."""
        reader = self.reader
        for start in range(0, len(self.todo), step):
            planned = self.todo[start : start + step]
            wanted = [i for i in planned if not reader.hydrated.has(i)]
            with self._lock:
                self.done += len(planned) - len(wanted)  # hydrated already (the VM read them)
            runs = reader.runs(wanted)
            # a chunk the slice holds twice is in one run once (read-ahead shares it through the chunk cache);
            # the read cache keeps chunks by position, so each other position is fetched alone
            placed = {index for run in runs for index, _ in run}
            yield from runs
            yield from ([(index, None)] for index in wanted if index not in placed)

    def _budget_spent(self, chunks: int) -> bool:
        cache = self.reader.hydrated.cache
        return cache.used + chunks * self.reader.chunk_size > cache.budget

    def _one(self, run: list[tuple[int, PackRecord | None]]) -> None:
        if self._stop.is_set():
            return
        try:
            errors = self.reader.hydrate_run(run)
        except BootbackError as exc:  # not a chunk's own error (the read cache's file): the whole run failed
            errors = [exc] * len(run)
        with self._lock:
            self.done += len(run) - len(errors)
            self.failed += len(errors)
        for exc in errors:
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

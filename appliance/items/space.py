"""Free space kept on the work directory's file system while an item job runs.

The work directory (``--work-dir``, default ``STATE/items``) usually shares its file system with the write caches
of running Instant-Recovery VMs (``STATE/cache``). An item job writes there: crash recovery copies relation and
WAL files up into the overlay, a dump or export is made in a scratch directory. So a job keeps the file system
above the daemon's own ``--min-free`` (the same ``BOOTBACK_MIN_FREE`` and the same default): it is refused when
free space is already below, and stopped (its server and dump tool killed, the workspace removed, one error line)
as soon as free space falls below it. Bytes that pass through our code (a dump tool's output) are counted before
they are written, a strict bound; what a server writes itself is seen by a poll every ``POLL_INTERVAL``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from contextlib import suppress
from pathlib import Path
from typing import IO

from appliance.config import DaemonConfig
from appliance.errors import ItemRecoveryError
from appliance.units import parse_size

RESERVE_ENV = "BOOTBACK_MIN_FREE"  # the daemon's: the write caches and item jobs keep the same minimum
POLL_INTERVAL = 0.2
PIECE = 1 << 20


def default_reserve() -> int:
    """The daemon's --min-free: $BOOTBACK_MIN_FREE, or its default."""
    text = os.environ.get(RESERVE_ENV)
    return parse_size(text) if text else DaemonConfig.min_free_bytes


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class SpaceGuard:
    """Watches ``directory``'s file system while a job runs; ``watch`` the job's own processes so a breach can stop
    them. ``tripped`` holds the free bytes seen at the breach."""

    def __init__(self, directory: Path, reserve: int, interval: float = POLL_INTERVAL) -> None:
        self.directory, self.reserve, self.interval = Path(directory), reserve, interval
        self.tripped: int | None = None
        self._procs: list[tuple[subprocess.Popen, bool]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def error(self, free: int) -> ItemRecoveryError:
        return ItemRecoveryError(
            f"item recovery stopped: {self.directory} has {free:,} bytes free, below the reserve of "
            f"{self.reserve:,} bytes kept for running VMs' write caches (free space there, choose another "
            f"--work-dir, or lower {RESERVE_ENV})"
        )

    def check(self) -> None:
        """Refuse (or stop) the job when free space is below the reserve now."""
        self.claim(0)

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._poll, name="item-space-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def watch(self, proc: subprocess.Popen, group: bool = False) -> None:
        """``proc`` is one of the job's own children; ``group``: it leads a process group it was started in
        (``start_new_session``), so its own children (a server's backends) go with it."""
        with self._lock:
            self._procs.append((proc, group))
            if self.tripped is None:
                return
        self._kill(proc, group)

    def copy(self, src: IO[bytes], dst: IO[bytes]) -> None:
        """``src`` into ``dst`` (on the guarded file system), never writing a piece that would cross the reserve."""
        while piece := src.read(PIECE):
            self.claim(len(piece))
            dst.write(piece)
            dst.flush()

    def claim(self, size: int) -> None:
        """Before our own code writes ``size`` bytes there: stop the job if they would cross the reserve."""
        free = free_bytes(self.directory)
        if free - size < self.reserve:
            self._trip(free)
        if self.tripped is not None:
            raise self.error(self.tripped)

    def run_into(self, cmd: list[str], out: IO[bytes]) -> tuple[int, str]:
        """Run one of the job's tools (a dump) with its output counted into ``out``: its exit status and errors."""
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            self.watch(proc)
            try:
                self.copy(proc.stdout, out)
            finally:
                proc.stdout.close()  # a tool stopped halfway gets EPIPE, or was killed by the breach
                proc.wait()
            err.seek(0)
            return proc.returncode, err.read().decode(errors="replace")

    def _poll(self) -> None:
        while not self._done.wait(self.interval):
            with suppress(OSError):
                free = free_bytes(self.directory)
                if free < self.reserve:
                    self._trip(free)
                    return

    def _trip(self, free: int) -> None:
        with self._lock:
            if self.tripped is None:
                self.tripped = free
            procs = list(self._procs)
        for proc, group in procs:
            self._kill(proc, group)

    @staticmethod
    def _kill(proc: subprocess.Popen, group: bool) -> None:
        if proc.poll() is not None:
            return
        with suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)  # ours: made by start_new_session for this process
            else:
                proc.kill()

"""Finding objects a backend has no path for, at a bounded cost (STYLE.md rule 14).

``LocalFS`` names objects by inode and remembers where each one lives. A handle whose inode it does not know
(one issued before a restart, or one whose object is gone) can only be placed by walking the export. Left
alone that is a denial of service: a client removes a file and repeats the old handle, and every call walks
the whole tree. So a walk here:

* is **complete or bounded**: it visits at most ``max_entries`` directory entries, and records every object it
  saw, so one walk places all the handles from before a restart at once;
* **answers for a while**: until ``valid_for`` seconds have passed or ``invalidate()`` is called (the backend
  does when it sees the tree changed behind its back), an inode the last walk did not see is STALE without
  walking again. The backend keeps its map exact for the changes it makes itself, so those need no new walk;
* **is one at a time and takes a bounded share of time**: a call that needs a walk while one runs waits up to
  ``wait`` seconds for it (and then uses its result); one that finds no walk running but would start one before
  walks have rested ``1/duty - 1`` times as long as the last one took gets NFS3ERR_JUKEBOX ("try again later";
  clients retry), as does one that waited in vain. So walks take at most ``duty`` of one core, plus one walk.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from nfsd.beneath import open_beneath
from nfsd.ratelog import limited
from nfsd.vfs import NFSError, Status

log = logging.getLogger("nfsd")


@dataclass(frozen=True)
class SearchLimits:
    max_entries: int = 100_000  # entries one walk may visit; a larger export may answer STALE for old handles
    valid_for: float = 60.0  # seconds a walk answers "not there" for what it did not see
    duty: float = 0.2  # share of time walks may take
    wait: float = 1.0  # seconds a call waits for a running walk before JUKEBOX

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.valid_for < 0 or not 0 < self.duty <= 1 or self.wait < 0:
            raise ValueError(f"bad search limits {self}")


class Found(NamedTuple):
    """One object a walk saw: ``ino`` is ``name`` in the directory ``parent``."""

    ino: int
    parent: int
    name: str
    is_dir: bool


class TreeSearch:
    def __init__(self, root_fd: int, dev: int, use_openat2: bool, limits: SearchLimits = SearchLimits()) -> None:
        self._root_fd, self._dev, self._openat2, self.limits = root_fd, dev, use_openat2, limits
        self._walking = threading.Lock()
        self._state = threading.Lock()
        self._epoch = 0  # bumped by invalidate()
        self._last: tuple[int, float] | None = None  # (epoch, monotonic start) of the last finished walk
        self._next_allowed = 0.0  # monotonic time before which no walk starts (the duty cycle)
        self.walks = 0  # finished walks, for tests and monitoring
        self.entries = 0  # entries visited by all of them

    def invalidate(self) -> None:
        """The tree may have changed in a way the backend's map does not know: the next miss walks again."""
        with self._state:
            self._epoch += 1

    def _fresh(self, now: float) -> bool:
        last = self._last
        return last is not None and last[0] == self._epoch and now - last[1] < self.limits.valid_for

    def refresh(self, record: Callable[[list[Found]], None], wanted: int) -> None:
        """Make sure a recent walk at the current epoch has been ``record``ed (walking now if needed), so an
        inode still unknown afterwards is not there. NFSError(JUKEBOX) if a walk is needed but another one
        runs or the duty cycle forbids it now; ``wanted`` is the inode asked for, for messages."""
        with self._state:
            if self._fresh(time.monotonic()):
                return
        if not self._walking.acquire(timeout=self.limits.wait):
            raise NFSError(Status.JUKEBOX, f"object {wanted}: another search of the export is still running")
        try:
            start = time.monotonic()
            with self._state:
                if self._fresh(start):
                    return  # a walk finished while we waited for the lock: its result answers
                if start < self._next_allowed:
                    raise NFSError(Status.JUKEBOX, f"object {wanted}: export searched too often, retry later")
                epoch = self._epoch
            try:
                found, complete = self._walk()
                record(found)
            finally:
                end = time.monotonic()
                with self._state:
                    self._next_allowed = end + (end - start) * (1 / self.limits.duty - 1)
            with self._state:
                self._last = (epoch, start)
                self.walks += 1
                self.entries += len(found)
            log.debug("handle search for object %d walked %d entries in %.3f s", wanted, len(found), end - start)
            if not complete:
                limited.log(
                    log,
                    logging.WARNING,
                    "handle search stopped after %d entries (max_entries): objects beyond them answer STALE",
                    self.limits.max_entries,
                )
        finally:
            self._walking.release()

    def _walk(self) -> tuple[list[Found], bool]:
        """Every object under the root, depth first, through real directories only (no symlink followed),
        at most ``max_entries`` of them; and whether that was all."""
        found: list[Found] = []
        pending: list[list[str]] = [[]]
        while pending:
            parts = pending.pop()
            try:
                fd = open_beneath(self._root_fd, parts, os.O_RDONLY | os.O_DIRECTORY, self._openat2)
            except OSError:
                continue  # removed or replaced while we walk
            try:
                dino = os.fstat(fd).st_ino
                with os.scandir(fd) as it:
                    for entry in it:
                        if len(found) >= self.limits.max_entries:
                            return found, False
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if st.st_dev != self._dev:
                            continue  # another file system mounted inside: not ours to serve
                        is_dir = stat.S_ISDIR(st.st_mode)
                        found.append(Found(st.st_ino, dino, entry.name, is_dir))
                        if is_dir:
                            pending.append([*parts, entry.name])
            finally:
                os.close(fd)
        return found, True

"""A repository in a local directory: the format of earlier versions, byte for byte.

Crash story: chunks are written to the writer's own ``tmp/<uuid>/``, made durable together with one ``syncfs``
(instead of one fsync per chunk), then renamed into ``chunks/ab/`` and the directories fsynced, before the point
that names them is written (temp file, fsync, rename, directory fsync): a visible chunk or point is always whole.

Concurrency: backups hold a *shared* ``flock`` on ``lock`` for their whole run, garbage collection the
*exclusive* one, so it never deletes a chunk a running backup has just deduplicated against. Readers take no
lock: objects are immutable and appear by atomic rename. Files are opened through ``safefile`` (no symlink
followed, no FIFO blocking a reader, sizes bounded). Everything is private: directories 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from appliance.atomicfile import create_once, fsync_dir, write_atomic
from appliance.errors import IntegrityError, NoSpaceError, RepositoryLockedError
from appliance.repo import safefile
from appliance.repo.backends import ChunkBatch, ObjectInfo, ObjectStore

DIR_MODE = 0o700  # a repository holds whole disks: private to its owner
FILE_MODE = 0o600
SUBDIRS = ("chunks", "points", "tmp")  # packs/ and index/ appear with the first packed backup


class LocalStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = self.local_path = Path(root)
        self.location = str(self.root)
        self.name = self.root.name

    def _file(self, key: str) -> Path:
        return self.root / key

    def is_empty(self) -> bool:
        return not (self.root.exists() and any(self.root.iterdir()))

    def create(self) -> None:
        self.root.mkdir(DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, DIR_MODE)  # also when the (empty) directory was given
        for sub in SUBDIRS:
            (self.root / sub).mkdir(DIR_MODE, exist_ok=True)
        os.close(os.open(self.root / "lock", os.O_WRONLY | os.O_CREAT, FILE_MODE))

    def get(self, key: str, name: str, limit: int) -> bytes:
        path = self._file(key)
        try:
            return safefile.read_regular(path, name, limit)
        except (FileNotFoundError, IntegrityError):
            raise
        except OSError as exc:
            raise IntegrityError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None

    def read_range(self, key: str, start: int, end: int, name: str) -> tuple[bytes, int]:
        path = self._file(key)
        fd, size = safefile.open_regular(path, name)
        try:
            want = max(0, min(end + 1, size) - start)
            data = os.pread(fd, want, start) if want else b""
        except OSError as exc:
            raise IntegrityError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if len(data) != want:  # shrank meanwhile: never a short answer passed on as the object's bytes
            raise IntegrityError(f"{name}: {path}: read {len(data)} of bytes {start}-{end} ({size} bytes)")
        return data, size

    def open(self, key: str, name: str) -> BinaryIO:
        fd, _size = safefile.open_regular(self._file(key), name)
        return os.fdopen(fd, "rb")

    def put(self, key: str, data: bytes) -> None:
        path = self._file(key)
        new_dir = not path.parent.exists()
        path.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
        write_atomic(path, data, FILE_MODE)
        if new_dir:
            fsync_dir(path.parent.parent)

    def put_new(self, key: str, data: bytes) -> bool:
        path = self._file(key)
        path.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
        return create_once(path, data, FILE_MODE)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._file(key))

    def delete(self, key: str) -> None:
        path = self._file(key)
        path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(path.parent)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Entries below the folder ``prefix``, two levels deep (``chunks/ab/x``, ``points/vm/x``); symlinked
        folders are not walked (garbage collection deletes what this lists, and must never delete outside the
        repository), names starting with '.' (temporary files) are skipped. Whatever else sits at the second
        level is listed as it is (a directory or FIFO named like a point is reported damaged when opened)."""
        yield from _walk(self.root, prefix.rstrip("/"), depth=2)

    @contextlib.contextmanager
    def writer(self) -> Iterator[ChunkBatch]:
        with self._lock(fcntl.LOCK_SH, wait=False, what="back up"):
            tmp = self.root / "tmp" / uuid.uuid4().hex
            tmp.mkdir(DIR_MODE, parents=True)
            try:
                yield _LocalBatch(self, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        with self._lock(fcntl.LOCK_EX, wait=wait, what="collect garbage in"):
            yield

    @contextlib.contextmanager
    def _lock(self, mode: int, wait: bool, what: str) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise RepositoryLockedError(
                        f"cannot {what} repository {self.location}: garbage collection is running; try again shortly"
                        if mode == fcntl.LOCK_SH
                        else f"cannot {what} repository {self.location}: a backup is running"
                    ) from None
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def collectable_before(self) -> float:
        return float("inf")  # the flock excludes every writer: no grace period needed

    def clean_stale(self) -> None:
        for entry in (self.root / "tmp").iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for stale in (self.root / "points").glob("*/.*.tmp"):
            stale.unlink(missing_ok=True)


def _walk(root: Path, folder: str, depth: int) -> Iterator[ObjectInfo]:
    try:
        entries = sorted(os.scandir(root / folder), key=lambda e: e.name)
    except FileNotFoundError:
        return  # nothing stored there yet
    except OSError as exc:  # a file where the folder should be is damage, never an empty listing
        raise IntegrityError(f"repository {root}: cannot list {root / folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        key = f"{folder}/{entry.name}"
        if depth > 1 and entry.is_dir(follow_symlinks=False):
            yield from _walk(root, key, depth - 1)
            continue
        try:
            st = entry.stat(follow_symlinks=False)  # a symlink's own size, never its target's
        except FileNotFoundError:
            continue
        yield ObjectInfo(key, st.st_size, st.st_mtime)


class _LocalBatch(ChunkBatch):
    def __init__(self, store: LocalStore, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        self._staged: list[tuple[str, Path]] = []
        self._lock = threading.Lock()

    def stage(self, key: str, blob: bytes) -> None:
        tmp = self.tmp / key.rsplit("/", 1)[-1]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                start_writeback(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"no space left in repository {self.store.location} while writing {key}") from exc
            raise
        with self._lock:
            self._staged.append((key, tmp))

    def has(self, key: str) -> bool:
        return self.store.exists(key)

    def publish(self) -> None:
        sync_filesystem(self.tmp)
        dirs = set()
        for key, tmp in self._staged:  # in staging order: a pack before the index that names it
            final = self.store._file(key)
            final.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
            os.replace(tmp, final)
            dirs.add(final.parent)
        tops = {self.store.root / key.split("/", 1)[0] for key, _ in self._staged}  # chunks/, packs/, index/
        for d in sorted(dirs | tops | {self.store.root}):  # every folder that gained an entry
            fsync_dir(d)
        self._staged.clear()

    def check_alive(self) -> None:
        return None  # the flock lasts as long as the process holds it

    def write_point(self, key: str, data: bytes) -> None:
        self.store.put(key, data)  # under the flock: no lease to outlive


def sync_filesystem(path: Path) -> None:
    """syncfs(2) on the file system holding ``path`` (os.sync() where libc has no syncfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            if _syncfs is not None:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
            os.sync()
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file out now, without waiting (sync_file_range WRITE), so the disk
    works while we compress the next chunks and the final sync has little left to do."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)  # SYNC_FILE_RANGE_WRITE


def _libc(name: str):  # noqa: ANN202
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_syncfs = _libc("syncfs")
_sync_file_range = _libc("sync_file_range")

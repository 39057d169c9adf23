"""The chunk store: hash -> bytes, content-addressed, zstd-compressed, written atomically.

It knows nothing of VMs or restore points (borg's Repository vs Archive split). A chunk is one file,
``chunks/<first two hex digits>/<hex digest>``, framed by ``objects``. Writes go to a temporary file in the
writer's own temp directory, are fsynced, then renamed into place, so a crash leaves either no chunk or a
whole one; directories are fsynced before a restore point that references the chunks is committed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import zstandard

from appliance.atomicfile import fsync_dir
from appliance.errors import IntegrityError, NoSpaceError
from appliance.repo import objects, safefile

DIR_MODE = 0o700  # a repository holds whole disks: private to its owner
FILE_MODE = 0o600
HASH_NAME = "sha256"  # SHA-NI makes it the fastest cryptographic hash on current x86 (~1.9 GB/s here)
DIGEST_HEX_LEN = 64


def chunk_id(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkStore:
    """Content-addressed chunk files under ``root/chunks``; safe for many threads and processes."""

    def __init__(self, root: Path, max_chunk: int, compression_level: int = 3) -> None:
        """``max_chunk``: the repository's chunk size; a chunk file claiming more is refused unread."""
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.max_chunk = max_chunk
        self._max_file = objects.max_object_size(max_chunk)
        self._level = compression_level
        self._local = threading.local()

    # zstd contexts are not thread-safe; one per thread is cheap.
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self._level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def path(self, cid: str) -> Path:
        return self.chunks_dir / cid[:2] / cid

    def exists(self, cid: str) -> bool:
        return os.path.exists(self.chunks_dir / cid[:2] / cid)

    def stage(self, cid: str, data: bytes | bytearray | memoryview, tmp_dir: Path) -> tuple[Path, int] | None:
        """Write chunk ``cid`` into the writer's ``tmp_dir``: neither durable nor visible yet (``publish`` makes
        it both). Returns (temp path, bytes written), or None when the repository already has the chunk."""
        if self.exists(cid):
            return None
        blob = objects.pack(objects.CHUNK_MAGIC, data, self._compressor().compress(data))
        tmp = tmp_dir / cid
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
                raise NoSpaceError(f"no space left in repository {self.root} while writing chunk {cid}") from exc
            raise
        return tmp, len(blob)

    def publish(self, staged: list[tuple[str, Path]], tmp_dir: Path) -> None:
        """Make staged chunks durable with one file-system sync (instead of one fsync per chunk), then move them
        into place and make the renames durable: a chunk that is visible is always whole."""
        sync_filesystem(tmp_dir)
        for cid, tmp in staged:
            final = self.path(cid)
            final.parent.mkdir(DIR_MODE, exist_ok=True)
            os.replace(tmp, final)
        self.sync_dirs()

    def get(self, cid: str, context: str = "") -> bytes:
        """Return the chunk's bytes, verified against its hash; ``context`` names who asked (a restore point)."""
        where = f" (needed by {context})" if context else ""
        name = f"chunk {cid}{where}"
        path = self.chunks_dir / cid[:2] / cid
        try:
            blob = safefile.read_regular(path, name, self._max_file)
        except FileNotFoundError:
            raise IntegrityError(f"chunk {cid} is missing{where}") from None
        except OSError as exc:
            raise IntegrityError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
        data = objects.unpack(objects.CHUNK_MAGIC, blob, name, self._decompressor(), self.max_chunk)
        if hashlib.sha256(data).hexdigest() != cid:
            raise IntegrityError(f"chunk {cid} is corrupt: its content does not match its hash{where}")
        return data

    def stored_size(self, cid: str) -> int:
        return os.lstat(self.path(cid)).st_size  # a symlink's own size, never its target's

    def iter_ids(self) -> Iterator[str]:
        """Every chunk file's id; a symlinked subdirectory is not walked (garbage collection deletes what this
        lists, and must never delete outside the repository)."""
        if not self.chunks_dir.exists():
            return
        for sub in sorted(os.scandir(self.chunks_dir), key=lambda e: e.name):
            if sub.is_dir(follow_symlinks=False):
                for entry in os.scandir(sub.path):
                    if len(entry.name) == DIGEST_HEX_LEN:
                        yield entry.name

    def delete(self, cid: str) -> None:
        self.path(cid).unlink(missing_ok=True)

    def sync_dirs(self) -> None:
        """fsync every chunk directory, so renames made before are durable before a manifest points at them."""
        if not self.chunks_dir.exists():
            return
        for sub in self.chunks_dir.iterdir():
            fsync_dir(sub)
        fsync_dir(self.chunks_dir)


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

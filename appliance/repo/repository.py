"""A repository: a chunk store plus restore-point manifests, with its format recorded in ``config.json``.

Concurrency: writers (backups) hold a *shared* lock on ``lock`` for their whole run, so any number of
backups may run at once (chunk writes are idempotent, manifests have unique names). Garbage collection holds
the *exclusive* lock, so it never deletes a chunk that a running backup has just deduplicated against.
Readers take no lock: chunks are immutable and manifests appear by atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from appliance.errors import (
    NotARepositoryError,
    RepositoryLockedError,
    RestorePointNotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from appliance.repo import objects
from appliance.repo.manifest import RestorePoint, check_vm_name
from appliance.repo.store import ChunkStore, fsync_dir

REPO_MAGIC = "bootback-repository"
REPO_FORMAT = 1
KNOWN_FEATURES: frozenset[str] = frozenset()
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_CHUNK = 1024 * 1024


@dataclass
class RepoConfig:
    id: str
    chunk_size: int
    format: int = REPO_FORMAT
    features: tuple[str, ...] = ()
    hash: str = "sha256"
    compression: str = "zstd,3"


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise UsageError(f"chunk size {size} must be a power of two between 64 KiB and 4 MiB")
    return size


def parse_size(text: str) -> int:
    """'1M', '64K', '4MiB', '1048576' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMGT" and t[-1:] else t
    if not digits.isdigit():
        raise UsageError(f"invalid size {text!r}: expected e.g. 64K, 1M, 4M")
    return int(digits) * mult


class Repository:
    def __init__(self, path: Path, config: RepoConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.store = ChunkStore(self.path)
        from appliance.repo.reader import ChunkCache

        self.chunk_cache = ChunkCache()

    # --- creation and opening -------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path | str, chunk_size: int = DEFAULT_CHUNK) -> Repository:
        path = Path(path)
        check_chunk_size(chunk_size)
        if path.exists() and any(path.iterdir()):
            raise UsageError(f"cannot create a repository in {path}: the directory is not empty")
        path.mkdir(parents=True, exist_ok=True)
        for sub in ("chunks", "points", "tmp"):
            (path / sub).mkdir(exist_ok=True)
        (path / "lock").touch()
        config = RepoConfig(id=uuid.uuid4().hex, chunk_size=chunk_size)
        doc = {"magic": REPO_MAGIC, **config.__dict__, "features": list(config.features)}
        _atomic_write(path / "config.json", json.dumps(doc, indent=2).encode() + b"\n")
        return cls(path, config)

    @staticmethod
    def is_repository(path: Path | str) -> bool:
        """Whether PATH looks like a repository (its config names bootback); open() tells what is wrong."""
        try:
            return json.loads((Path(path) / "config.json").read_text()).get("magic") == REPO_MAGIC
        except (OSError, ValueError, AttributeError):
            return False

    @classmethod
    def open(cls, path: Path | str) -> Repository:
        path = Path(path)
        cfg_path = path / "config.json"
        try:
            doc = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise NotARepositoryError(f"{path} is not a bootback repository (no config.json)") from None
        except (OSError, ValueError) as exc:
            raise NotARepositoryError(f"{path} is not a bootback repository ({cfg_path}: {exc})") from None
        if not isinstance(doc, dict) or doc.get("magic") != REPO_MAGIC:
            raise NotARepositoryError(f"{path} is not a bootback repository (config.json has no bootback magic)")
        fmt = doc.get("format")
        if not isinstance(fmt, int) or fmt > REPO_FORMAT:
            raise UnsupportedFormatError(
                f"repository {path} has format {fmt}, newer than this bootback supports ({REPO_FORMAT}): upgrade"
            )
        unknown = set(doc.get("features", [])) - KNOWN_FEATURES
        if unknown:
            raise UnsupportedFormatError(f"repository {path} uses features this bootback lacks: {sorted(unknown)}")
        config = RepoConfig(
            id=doc["id"],
            chunk_size=check_chunk_size(int(doc["chunk_size"])),
            format=fmt,
            features=tuple(doc.get("features", [])),
            hash=doc.get("hash", "sha256"),
            compression=doc.get("compression", "zstd,3"),
        )
        return cls(path, config)

    # --- locking ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator[Path]:
        """A backup's right to add chunks and a manifest: a shared lock plus a private temp directory."""
        with self._lock(fcntl.LOCK_SH, wait=False, what="back up"):
            tmp = self.path / "tmp" / uuid.uuid4().hex
            tmp.mkdir(parents=True)
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        """Held by garbage collection: no backup runs meanwhile."""
        with self._lock(fcntl.LOCK_EX, wait=wait, what="collect garbage in"):
            yield

    @contextlib.contextmanager
    def _lock(self, mode: int, wait: bool, what: str) -> Iterator[None]:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise RepositoryLockedError(
                        f"cannot {what} repository {self.path}: garbage collection is running; try again shortly"
                        if mode == fcntl.LOCK_SH
                        else f"cannot {what} repository {self.path}: a backup is running"
                    ) from None
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def clean_tmp(self) -> int:
        """Remove temp files of dead writers (call under the exclusive lock); returns how many dirs went."""
        n = 0
        for entry in (self.path / "tmp").iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            n += 1
        return n

    # --- restore points --------------------------------------------------------------------------------
    def _point_path(self, vm: str, point_id: str) -> Path:
        return self.path / "points" / vm / f"{point_id}.point"

    def commit_point(self, point: RestorePoint) -> None:
        """Make ``point`` visible; every chunk it names must already be durable (``store.sync_dirs``)."""
        raw = point.to_json()
        blob = objects.pack(objects.POINT_MAGIC, raw, zstandard.ZstdCompressor(level=3).compress(raw))
        target = self._point_path(point.vm, point.id)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, blob)
        fsync_dir(target.parent.parent)

    def delete_point(self, point: RestorePoint) -> None:
        path = self._point_path(point.vm, point.id)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def _load_point(self, path: Path) -> RestorePoint:
        blob = path.read_bytes()
        name = f"restore point {path.parent.name}@{path.stem}"
        raw = objects.unpack(objects.POINT_MAGIC, blob, name, zstandard.ZstdDecompressor())
        return RestorePoint.from_json(raw, name)

    def vms(self) -> list[str]:
        root = self.path / "points"
        return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.point")))

    def restore_points(self, vm: str | None = None) -> list[RestorePoint]:
        """All restore points (of one VM if given), oldest first."""
        names = [vm] if vm else self.vms()
        points: list[RestorePoint] = []
        for name in names:
            folder = self.path / "points" / name
            if not folder.is_dir():
                continue
            points.extend(self._load_point(p) for p in sorted(folder.glob("*.point")))
        points.sort(key=lambda p: (p.time, p.vm, p.id))
        return points

    def restore_point(self, vm: str, point: str = "latest") -> RestorePoint:
        check_vm_name(vm)
        if point == "latest":
            points = self.restore_points(vm)
            if not points:
                raise RestorePointNotFoundError(f"no restore points of VM {vm!r} in {self.path}")
            return points[-1]
        path = self._point_path(vm, point)
        if not path.exists():
            raise RestorePointNotFoundError(f"no restore point {vm}@{point} in {self.path}")
        return self._load_point(path)

    def resolve(self, ref: str) -> RestorePoint:
        """'VM@POINT' or 'VM' (latest) -> RestorePoint."""
        vm, _, point = ref.partition("@")
        return self.restore_point(vm, point or "latest")

    def open_disk(self, point: RestorePoint, disk: str, read_cache=None):  # -> DiskReader  # noqa: ANN001
        """Random access to one disk; with a ``ReadCache``, chunks read once are served from local files."""
        from appliance.repo.reader import DiskReader

        entry = point.disk(disk)
        hydrated = None
        if read_cache is not None:
            hydrated = read_cache.disk(f"{self.config.id[:8]}-{point.vm}-{point.id}-{entry.name}", entry.size,
                                       entry.chunk_size)  # fmt: skip
            hydrated.mark_zeros(entry.chunks)
        return DiskReader(self, point, entry, hydrated)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def find_repositories(directory: Path) -> list[Path]:
    """DIR itself if it is a repository, else its subdirectories that are (one level: one volume each)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"repository directory {directory}: not a directory")
    if Repository.is_repository(directory):
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and Repository.is_repository(p))

"""A repository: a chunk store plus restore-point files, with its format recorded in ``config.json``.

Concurrency: writers (backups) hold a *shared* lock on ``lock`` for their whole run, so any number of
backups may run at once (chunk writes are idempotent, point files have unique names). Garbage collection holds
the *exclusive* lock, so it never deletes a chunk that a running backup has just deduplicated against.
Readers take no lock: chunks are immutable and point files appear by atomic rename.

Everything is private to the repository's owner: directories 0700, files 0600 (older repositories, with
0444 chunks and 0755 directories, are read and written as they are).
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

from appliance.atomicfile import fsync_dir, write_atomic
from appliance.errors import (
    BootbackError,
    IntegrityError,
    NotARepositoryError,
    RepositoryLockedError,
    RestorePointNotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from appliance.repo import pointfile, safefile
from appliance.repo.manifest import POINT_ID_RE, DamagedPoint, RestorePoint, check_point, check_vm_name
from appliance.repo.reader import ChunkCache, DiskReader
from appliance.repo.store import DIR_MODE, FILE_MODE, ChunkStore
from appliance.units import MiB, parse_size

# parse_size: for older importers
__all__ = ["DEFAULT_CHUNK", "PointListing", "Repository", "find_repositories", "parse_size"]

REPO_MAGIC = "bootback-repository"
REPO_FORMAT = 2  # 2: sealed (checksummed) point files with a summary; format-1 repositories are read and upgraded
KNOWN_FEATURES: frozenset[str] = frozenset()
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * MiB
DEFAULT_CHUNK = MiB


@dataclass
class RepoConfig:
    id: str
    chunk_size: int
    format: int = REPO_FORMAT
    features: tuple[str, ...] = ()
    hash: str = "sha256"
    compression: str = "zstd,3"

    def to_json(self) -> bytes:
        doc = {"magic": REPO_MAGIC, **self.__dict__, "features": list(self.features)}
        return json.dumps(doc, indent=2).encode() + b"\n"


@dataclass
class PointListing:
    """What ``Repository.list_points`` found: readable points (oldest first) and damaged point files."""

    points: list[RestorePoint]
    damaged: list[DamagedPoint]

    def entries(self) -> list[RestorePoint | DamagedPoint]:
        """Both, in point id (time) order: how a listing shows them."""
        return sorted([*self.points, *self.damaged], key=lambda p: (p.id, p.vm))

    def as_json(self) -> list[dict]:
        """The listing's JSON: each point's summary with ``"damaged": false``, each damaged file as
        ``{"vm", "id", "damaged": true, "error"}``."""
        return [
            p.summary() if isinstance(p, DamagedPoint) else {**p.summary(), "damaged": False} for p in self.entries()
        ]


MAX_CONFIG_BYTES = 64 << 10  # config.json is a few hundred bytes


def _read_config(path: Path) -> object:
    """The parsed config.json of the repository at ``path`` (a regular file of at most MAX_CONFIG_BYTES)."""
    return json.loads(safefile.read_regular(path / "config.json", f"repository {path}: config.json", MAX_CONFIG_BYTES))


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise UsageError(f"chunk size {size} must be a power of two between 64 KiB and 4 MiB")
    return size


class Repository:
    def __init__(self, path: Path, config: RepoConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.store = ChunkStore(self.path, config.chunk_size)
        self.chunk_cache = ChunkCache()

    # --- creation and opening -------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path | str, chunk_size: int = DEFAULT_CHUNK) -> Repository:
        path = Path(path)
        check_chunk_size(chunk_size)
        if path.exists() and any(path.iterdir()):
            raise UsageError(f"cannot create a repository in {path}: the directory is not empty")
        path.mkdir(DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)  # also when the (empty) directory was given
        for sub in ("chunks", "points", "tmp"):
            (path / sub).mkdir(DIR_MODE, exist_ok=True)
        os.close(os.open(path / "lock", os.O_WRONLY | os.O_CREAT, FILE_MODE))
        config = RepoConfig(id=uuid.uuid4().hex, chunk_size=chunk_size)
        write_atomic(path / "config.json", config.to_json(), FILE_MODE)
        return cls(path, config)

    @staticmethod
    def is_repository(path: Path | str) -> bool:
        """Whether PATH looks like a repository (its config names bootback); open() tells what is wrong."""
        try:
            return _read_config(Path(path)).get("magic") == REPO_MAGIC
        except (OSError, ValueError, AttributeError, IntegrityError):
            return False

    @classmethod
    def open(cls, path: Path | str) -> Repository:
        path = Path(path)
        cfg_path = path / "config.json"
        try:
            doc = _read_config(path)
        except FileNotFoundError:
            raise NotARepositoryError(f"{path} is not a bootback repository (no config.json)") from None
        except IntegrityError as exc:
            raise NotARepositoryError(f"{path} is not a bootback repository ({exc})") from None
        except (OSError, ValueError) as exc:
            raise NotARepositoryError(f"{path} is not a bootback repository ({cfg_path}: {exc})") from None
        if not isinstance(doc, dict) or doc.get("magic") != REPO_MAGIC:
            raise NotARepositoryError(f"{path} is not a bootback repository (config.json has no bootback magic)")
        fmt = doc.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > REPO_FORMAT:
            raise UnsupportedFormatError(
                f"repository {path} has format {fmt}, newer than this bootback supports ({REPO_FORMAT}): upgrade"
            )
        unknown = set(doc.get("features", [])) - KNOWN_FEATURES
        if unknown:
            raise UnsupportedFormatError(f"repository {path} uses features this bootback lacks: {sorted(unknown)}")
        cs = doc.get("chunk_size")
        if not isinstance(doc.get("id"), str) or not isinstance(cs, int) or isinstance(cs, bool) or fmt < 1:
            raise NotARepositoryError(f"{path}: config.json is damaged (format {fmt!r}, id, chunk_size {cs!r})")
        config = RepoConfig(
            id=doc["id"],
            chunk_size=check_chunk_size(cs),
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
            tmp.mkdir(DIR_MODE, parents=True)
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
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
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
        check_point(point, self.config.chunk_size, point.vm, point.id, f"new restore point {point.ref}")
        if self.config.format < REPO_FORMAT:
            self._upgrade_config()
        target = self._point_path(point.vm, point.id)
        target.parent.mkdir(DIR_MODE, exist_ok=True)
        write_atomic(target, pointfile.encode(point), FILE_MODE)
        fsync_dir(target.parent.parent)

    def _upgrade_config(self) -> None:
        """A format-1 repository becomes format 2 before its first format-2 point is written, so an older
        bootback refuses the repository as a whole instead of meeting a point it cannot read."""
        self.config.format = REPO_FORMAT
        write_atomic(self.path / "config.json", self.config.to_json(), FILE_MODE)

    def delete_point(self, point: RestorePoint) -> None:
        path = self._point_path(point.vm, point.id)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def point_files(self, vm: str | None = None) -> Iterator[Path]:
        """Every point file (of one VM if given), in name order."""
        for name in [check_vm_name(vm)] if vm else self.vms():
            folder = self.path / "points" / name
            if folder.is_dir():
                yield from sorted(folder.glob("*.point"))

    def load_point(self, path: Path, with_chunks: bool = True) -> RestorePoint:
        """The checked point in ``path``; IntegrityError names it when the file is damaged."""
        return pointfile.load(path, self.config.chunk_size, with_chunks)

    def vms(self) -> list[str]:
        root = self.path / "points"
        try:
            return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.point")))
        except OSError as exc:
            raise IntegrityError(f"repository {self.path}: cannot list {root}: {exc.strerror or exc}") from None

    def list_points(self, vm: str | None = None, with_chunks: bool = False) -> PointListing:
        """Every point file (of one VM if given): the good points, oldest first, and the damaged ones with the
        reason. One unreadable file (damage, a newer format, an I/O error) never hides the others."""
        listing = PointListing([], [])
        for path in self.point_files(vm):
            try:
                listing.points.append(self.load_point(path, with_chunks))
            except FileNotFoundError:
                continue  # deleted since the folder was listed (prune): gone, not damaged
            except (BootbackError, OSError) as exc:
                reason = str(exc) if isinstance(exc, BootbackError) else f"{pointfile.point_name(path)}: {exc}"
                listing.damaged.append(DamagedPoint(path.parent.name, path.stem, reason))
        listing.points.sort(key=lambda p: (p.time, p.vm, p.id))
        return listing

    def restore_points(self, vm: str | None = None, with_chunks: bool = False) -> list[RestorePoint]:
        """The readable restore points (of one VM if given), oldest first; ``damaged_points`` names the others.
        Summaries (``disk.chunks`` is None) unless ``with_chunks``: listing reads a few hundred bytes per
        point, whatever the size of its disks."""
        return self.list_points(vm, with_chunks).points

    def damaged_points(self, vm: str | None = None) -> list[DamagedPoint]:
        """The point files (of one VM if given) whose summary cannot be read, with the reason."""
        return self.list_points(vm).damaged

    def restore_point(self, vm: str, point: str = "latest", with_chunks: bool = True) -> RestorePoint:
        check_vm_name(vm)
        if point == "latest":
            latest = self._latest(vm)
            return self.with_chunks(latest) if with_chunks else latest
        path = self._point_path(vm, point)
        if not POINT_ID_RE.match(point) or not path.exists():
            raise RestorePointNotFoundError(f"no restore point {vm}@{point} in {self.path}")
        return self.load_point(path, with_chunks)

    def _latest(self, vm: str) -> RestorePoint:
        """The newest point of ``vm``. Never an older one in place of a damaged newer one (or of a damaged file
        whose name tells no time): the caller would get other data than it asked for without knowing."""
        listing = self.list_points(vm)
        newest = listing.points[-1] if listing.points else None
        for bad in listing.damaged:
            if newest is None or not (POINT_ID_RE.match(bad.id) and bad.id < newest.id):
                older = f"name an older point explicitly, e.g. {newest.ref}" if newest else "no other point exists"
                raise IntegrityError(f"the latest restore point of VM {vm!r} cannot be read: {bad.error}; {older}")
        if newest is None:
            raise RestorePointNotFoundError(f"no restore points of VM {vm!r} in {self.path}")
        return newest

    def with_chunks(self, point: RestorePoint) -> RestorePoint:
        """``point`` with its chunk lists loaded (itself if they are)."""
        if point.has_chunks:
            return point
        return self.load_point(self._point_path(point.vm, point.id))

    def resolve(self, ref: str) -> RestorePoint:
        """'VM@POINT' or 'VM' (latest) -> RestorePoint."""
        vm, _, point = ref.partition("@")
        return self.restore_point(vm, point or "latest")

    def open_disk(self, point: RestorePoint, disk: str, read_cache=None) -> DiskReader:  # noqa: ANN001
        """Random access to one disk; with a ``ReadCache``, chunks read once are served from local files."""
        point = self.with_chunks(point)
        entry = point.disk(disk)
        hydrated = None
        if read_cache is not None:
            hydrated = read_cache.disk(
                f"{self.config.id[:8]}-{point.vm}-{point.id}-{entry.name}", entry.size, entry.chunk_size
            )
            hydrated.mark_zeros(entry.chunks)
        return DiskReader(self.store, self.chunk_cache, point, entry, hydrated)


def find_repositories(directory: Path) -> list[Path]:
    """DIR itself if it is a repository, else its subdirectories that are (one level: one volume each)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"repository directory {directory}: not a directory")
    if Repository.is_repository(directory):
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and Repository.is_repository(p))

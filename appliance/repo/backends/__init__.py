"""Where a repository's objects live: the small store interface and how a repository string picks one.

Everything above this interface (``ChunkStore``, ``Repository``, ``pointfile``, maintenance) is one code path
for every backend: it names objects by relative keys (``config.json``, ``chunks/ab/abcd...``,
``points/<vm>/<id>.point``) and never sees a file path or an HTTP request. Two implementations:

- ``local.LocalStore``: a directory; atomic renames, fsync, ``flock`` (the format of earlier versions, unchanged);
- ``s3.S3Store``: ``s3://BUCKET/PREFIX`` on any S3 service (Ceph RGW, MinIO, AWS) through boto3; lease objects
  instead of ``flock``, a grace period before garbage collection deletes young chunks.

What differs between the two is only *how* a rule is kept (durability, exclusion, staging), never the format:
the same object bytes sit at the same keys on both, so a repository can be copied from one to the other.
"""

from __future__ import annotations

import argparse
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key relative to the repository, stored size, and modification time (epoch s)."""

    key: str
    size: int
    mtime: float


class ChunkBatch(ABC):
    """A backup's chunk writes: staged while the backup runs, made durable and visible by ``publish``.

    A staged chunk may already be visible (S3 has no rename): that is harmless, since nothing references it
    until the restore point is committed, and garbage collection's grace period keeps it until then."""

    @abstractmethod
    def stage(self, key: str, blob: bytes) -> None:
        """Write ``blob`` as ``key``; thread-safe (a backup stages from its worker threads)."""

    @abstractmethod
    def has(self, key: str) -> bool:
        """Whether the repository already holds ``key`` (the backup's dedup check); thread-safe."""

    @abstractmethod
    def publish(self) -> None:
        """Every staged object durable and visible, before the restore point naming them is committed."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise RepositoryLockedError if the writer's right to add a point has lapsed (an expired lease)."""

    @abstractmethod
    def write_point(self, key: str, data: bytes) -> None:
        """Create the restore point ``key`` as the writer's last act, only while its right to add one holds, and
        so that it is visible before that right could lapse (RepositoryLockedError otherwise)."""

    def close(self) -> None:  # noqa: B027 - most batches hold nothing to release
        """Release what the batch holds (threads), published or not; the writer calls it once, last."""


class ObjectStore(ABC):
    """A flat namespace of immutable objects under one repository root, and the locks that guard it."""

    location: str  # what the user typed, normalised: a path, or s3://BUCKET/PREFIX
    name: str  # a short name for the repository (the daemon's key): the directory's or prefix's last part
    local_path: Path | None = None  # the directory, for a local store only
    read_ahead: int = 4  # chunks worth fetching ahead of a sequential reader
    remote: bool = False  # fetches wait on the network: readers fetch ahead in more threads

    @abstractmethod
    def is_empty(self) -> bool:
        """Nothing stored under the root yet (``init`` refuses a non-empty place)."""

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty root for a new repository (directories, lock file; checks the bucket answers)."""

    @abstractmethod
    def get(self, key: str, name: str, limit: int) -> bytes:
        """The whole object ``key`` if it holds at most ``limit`` bytes (refused unread otherwise, with
        IntegrityError naming ``name``); FileNotFoundError if it does not exist."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int, name: str) -> tuple[bytes, int]:
        """Bytes ``start..end`` (inclusive, clipped to the object) and the object's whole size; an answer of
        another length than that is IntegrityError naming ``name``; FileNotFoundError if ``key`` does not exist."""

    @abstractmethod
    def open(self, key: str, name: str) -> BinaryIO:
        """A seekable reader of ``key`` that fetches only what is read (point files: the summary first);
        FileNotFoundError if it does not exist."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` durably and atomically: readers see the old object or the new, whole."""

    @abstractmethod
    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists; False when it did (then nothing was written)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder ending in '/'), in key order."""

    @abstractmethod
    def writer(self) -> contextlib.AbstractContextManager[ChunkBatch]:
        """A backup's right to add chunks and a point: shared with other backups, excluded by garbage
        collection. Raises RepositoryLockedError while garbage collection runs."""

    @abstractmethod
    def exclusive(self, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """Garbage collection's right to delete: no backup runs meanwhile."""

    @abstractmethod
    def collectable_before(self) -> float:
        """Unreferenced chunks last modified before this time (epoch s) may be deleted; younger ones are kept
        (a grace period for writers the locks cannot see). Called under ``exclusive``."""

    @abstractmethod
    def clean_stale(self) -> None:
        """Remove leftovers of crashed writers (temporary files, expired leases); under ``exclusive``."""


def is_s3(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def open_store(location: str | Path) -> ObjectStore:
    """The store a repository string names: ``s3://BUCKET/PREFIX`` or a directory path."""
    if is_s3(location):
        from appliance.repo.backends.s3 import S3Store  # boto3 is imported only when an S3 repository is used

        return S3Store(str(location))
    from appliance.repo.backends.local import LocalStore

    return LocalStore(Path(location))


def repository_arg(value: str) -> str | Path:
    """argparse ``type`` for a repository: an ``s3://`` location stays a string, anything else is a path."""
    return value if is_s3(value) else Path(value)


def add_repository_argument(p: argparse.ArgumentParser) -> None:
    """The positional ``repo`` of a command that opens a repository."""
    p.add_argument("repo", type=repository_arg, help="a directory, or s3://BUCKET/PREFIX")

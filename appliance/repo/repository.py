"""A repository: a chunk store plus restore-point files, with its format recorded in ``config.json``.

Its objects live in an ``ObjectStore`` (``backends``: a directory, or ``s3://BUCKET/PREFIX``); this module names
them by key and never touches a file or a bucket itself, so one code path serves every backend.

Concurrency: writers (backups) hold the store's *shared* right (``writer``) for their whole run, so any number of
backups may run at once (chunk writes are idempotent, point files have unique names). Garbage collection holds
the *exclusive* right, so it never deletes a chunk that a running backup has just deduplicated against (a
``flock`` on a directory, lease objects on S3). Readers take no lock: objects are immutable and appear whole.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import (
    BootbackError,
    IntegrityError,
    NotARepositoryError,
    RepositoryKeyError,
    RestorePointNotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from appliance.repo import keys, pointfile
from appliance.repo.backends import ChunkBatch, ObjectStore, open_store
from appliance.repo.keys import KeySource, RepoKey
from appliance.repo.manifest import POINT_ID_RE, DamagedPoint, RestorePoint, check_point, check_vm_name
from appliance.repo.reader import ChunkCache, DiskReader
from appliance.repo.store import ChunkStore
from appliance.units import MiB, parse_size

# parse_size: for older importers
__all__ = ["DEFAULT_CHUNK", "PointListing", "Repository", "find_repositories", "parse_size"]

REPO_MAGIC = "bootback-repository"
REPO_FORMAT = 2  # 2: sealed (checksummed) point files with a summary; format-1 repositories are read and upgraded
ENCRYPTION_FEATURE = "encryption"  # objects in envelopes, chunk ids keyed: a bootback without it refuses the repository
PACKS_FEATURE = "packs"  # new chunks in pack objects found through index objects (docs/repository-format.md)
KNOWN_FEATURES: frozenset[str] = frozenset({ENCRYPTION_FEATURE, PACKS_FEATURE})
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
    encryption: dict | None = None  # keys.encryption_doc(); None: unencrypted (and absent from config.json)

    @property
    def encryption_name(self) -> str:
        """What ``points``, the page and the API show: the algorithm, or "none"."""
        return self.encryption["algorithm"] if self.encryption else keys.NONE

    def to_json(self) -> bytes:
        doc = {"magic": REPO_MAGIC, **self.__dict__, "features": list(self.features)}
        if self.encryption is None:
            del doc["encryption"]  # an unencrypted config stays what earlier versions wrote
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


def _read_config(backend: ObjectStore) -> object:
    """The parsed config.json of the repository in ``backend`` (an object of at most MAX_CONFIG_BYTES)."""
    return json.loads(backend.get("config.json", f"repository {backend.location}: config.json", MAX_CONFIG_BYTES))


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise UsageError(f"chunk size {size} must be a power of two between 64 KiB and 4 MiB")
    return size


class Repository:
    def __init__(self, where: Path | str | ObjectStore, config: RepoConfig, key: RepoKey | None = None) -> None:
        """``where``: a directory, ``s3://BUCKET/PREFIX`` or an opened store; ``key``: the key of an encrypted
        repository (``open`` unlocks it)."""
        self.backend = where if isinstance(where, ObjectStore) else open_store(where)
        self.location = self.backend.location  # what messages and listings show
        self.name = self.backend.name
        self.path = self.backend.local_path  # the directory of a local repository; None on S3
        self.config = config
        self.key = key
        self.store = ChunkStore(self.backend, config.chunk_size, key=key, packs=self.packed)
        self.chunk_cache = ChunkCache()
        self.plain_writes_refused: str | None = None  # why (``KeySource.check_plain``); set by ``open``

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def packed(self) -> bool:
        """Whether new chunks go into pack objects (the ``packs`` feature)."""
        return PACKS_FEATURE in self.config.features

    # --- creation and opening -------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: Path | str,
        chunk_size: int = DEFAULT_CHUNK,
        encryption: str = keys.NONE,
        key_source: KeySource | None = None,
        key_file: Path | None = None,
        packs: bool | None = None,
    ) -> Repository:
        """A new repository at ``path``. With ``encryption`` "aes-256-gcm" a random key is made and kept in
        ``key_file`` (only there) if given, else in config.json wrapped by a passphrase from ``key_source``.
        ``packs``: store chunks in pack objects; by default on object storage (where an object per chunk costs
        the service more than its bytes), not in a directory (whose format stays the earlier versions')."""
        backend = open_store(path)
        check_chunk_size(chunk_size)
        if encryption not in keys.ALGORITHMS:
            raise UsageError(f"encryption {encryption!r}: expected one of {', '.join(keys.ALGORITHMS)}")
        if not backend.is_empty():
            raise UsageError(f"cannot create a repository in {backend.location}: it is not empty")
        repo_id = uuid.uuid4().hex
        key, encryption_doc = None, None
        if encryption != keys.NONE:
            key = RepoKey.generate()
            where = f"repository {backend.location}"
            passphrase = None if key_file else (key_source or KeySource()).new_passphrase(where)
            encryption_doc = keys.encryption_doc(key, repo_id, passphrase)
            if key_file:
                keys.write_key_file(key_file, key, repo_id)
        backend.create()
        config = RepoConfig(id=repo_id, chunk_size=chunk_size)
        if key is not None:
            config.features, config.hash, config.encryption = (ENCRYPTION_FEATURE,), keys.CHUNK_ID_HMAC, encryption_doc
        if backend.remote if packs is None else packs:
            config.features = (*config.features, PACKS_FEATURE)
        if not backend.put_new("config.json", config.to_json()):
            raise UsageError(f"cannot create a repository in {backend.location}: another one was just created there")
        return cls(backend, config, key)

    @staticmethod
    def is_repository(path: Path | str) -> bool:
        """Whether PATH looks like a repository (its config names bootback); open() tells what is wrong."""
        try:
            return _read_config(open_store(path)).get("magic") == REPO_MAGIC
        except (OSError, ValueError, AttributeError, IntegrityError):
            return False

    @classmethod
    def open(cls, path: Path | str, key_source: KeySource | None = None) -> Repository:
        """The repository at ``path``; an encrypted one is unlocked with ``key_source`` (default: the
        environment's ``BOOTBACK_PASSPHRASE`` / ``BOOTBACK_KEY_FILE``, no prompt)."""
        backend = open_store(path)
        path = backend.location  # named in every message below
        cfg_path = f"{path}/config.json"
        try:
            doc = _read_config(backend)
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
        features = doc.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise NotARepositoryError(f"{path}: config.json is damaged (features {features!r:.100})")
        unknown = set(features) - KNOWN_FEATURES
        if unknown:
            raise UnsupportedFormatError(f"repository {path} uses features this bootback lacks: {sorted(unknown)}")
        cs = doc.get("chunk_size")
        if not isinstance(doc.get("id"), str) or not isinstance(cs, int) or isinstance(cs, bool) or fmt < 1:
            raise NotARepositoryError(f"{path}: config.json is damaged (format {fmt!r}, id, chunk_size {cs!r})")
        config = RepoConfig(
            id=doc["id"],
            chunk_size=check_chunk_size(cs),
            format=fmt,
            features=tuple(features),
            hash=doc.get("hash", "sha256"),
            compression=doc.get("compression", "zstd,3"),
        )
        key, source, refused = None, key_source or KeySource.from_env(), None
        if ENCRYPTION_FEATURE in config.features:
            config.encryption = keys.check_encryption_doc(doc.get("encryption"), f"repository {path}")
            key = source.unlock(f"repository {path}", config.id, config.encryption)
        else:  # config.json is not authenticated: the operator's key material says whether to trust "plain"
            refused = source.check_plain(f"repository {path}", config.id)
        repo = cls(backend, config, key)
        repo.plain_writes_refused = refused
        return repo

    def wrap_key(self, passphrase: str) -> None:
        """Keep this (encrypted) repository's key in config.json wrapped by ``passphrase`` (``key import``)."""
        if self.key is None or self.config.encryption is None:
            raise UsageError(f"repository {self.location} is not encrypted: it has no key")
        self.config.encryption = {**self.config.encryption, "key": keys.wrap(self.key, self.config.id, passphrase)}
        self.backend.put("config.json", self.config.to_json())

    # --- locking ---------------------------------------------------------------------------------------
    def writer(self) -> contextlib.AbstractContextManager[ChunkBatch]:
        """A backup's right to add chunks and a point, shared with other backups, and the batch its chunks go
        into. RepositoryLockedError while garbage collection runs."""
        self._check_plain_write()
        return self._writer()

    @contextlib.contextmanager
    def _writer(self) -> Iterator[ChunkBatch]:
        with self.backend.writer() as inner:
            batch = self.store.batch(inner)
            try:
                yield batch
            finally:
                batch.close()

    def _check_plain_write(self) -> None:
        if self.plain_writes_refused:
            raise RepositoryKeyError(self.plain_writes_refused)

    def exclusive(self, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """Held by garbage collection: no backup runs meanwhile."""
        return self.backend.exclusive(wait)

    def clean_tmp(self) -> None:
        """Remove leftovers of dead writers (call under ``exclusive``)."""
        self.backend.clean_stale()

    # --- restore points --------------------------------------------------------------------------------
    def commit_point(self, point: RestorePoint, batch: ChunkBatch | None = None) -> None:
        """Make ``point`` visible; every chunk it names must already be durable (``store.publish``). ``batch``:
        the writer's, whose right to commit is checked last (an S3 lease may have lapsed)."""
        check_point(point, self.config.chunk_size, point.vm, point.id, f"new restore point {point.ref}")
        self._check_plain_write()
        if self.config.format < REPO_FORMAT:
            self._upgrade_config()
        data = pointfile.encode(point, self.store.envelope)
        if batch is not None:
            batch.write_point(pointfile.point_key(point.vm, point.id), data)
        else:
            self.backend.put(pointfile.point_key(point.vm, point.id), data)

    def _upgrade_config(self) -> None:
        """A format-1 repository becomes format 2 before its first format-2 point is written, so an older
        bootback refuses the repository as a whole instead of meeting a point it cannot read."""
        self.config.format = REPO_FORMAT
        self.backend.put("config.json", self.config.to_json())

    def delete_point(self, point: RestorePoint) -> None:
        self.backend.delete(pointfile.point_key(point.vm, point.id))

    def point_files(self, vm: str | None = None) -> list[tuple[str, str]]:
        """(vm, point id) of every stored point (of one VM if given), in name order: from one listing."""
        found = []
        for info in self.backend.list(f"points/{check_vm_name(vm)}/" if vm else "points/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2].endswith(".point") and len(parts[2]) > len(".point"):
                found.append((parts[1], parts[2][: -len(".point")]))
        return sorted(found)

    def load_point(self, vm: str, point_id: str, with_chunks: bool = True) -> RestorePoint:
        """The checked point ``vm@point_id``; IntegrityError names it when its object is damaged."""
        name = pointfile.point_name(vm, point_id)
        f = self.backend.open(pointfile.point_key(vm, point_id), name)
        return pointfile.load(f, vm, point_id, self.config.chunk_size, with_chunks, self.store.envelope)

    def vms(self) -> list[str]:
        return sorted({vm for vm, _ in self.point_files()})

    def list_points(self, vm: str | None = None, with_chunks: bool = False) -> PointListing:
        """Every point file (of one VM if given): the good points, oldest first, and the damaged ones with the
        reason. One unreadable file (damage, a newer format, an I/O error) never hides the others."""
        listing = PointListing([], [])
        for name, point_id in self.point_files(vm):
            try:
                listing.points.append(self.load_point(name, point_id, with_chunks))
            except FileNotFoundError:
                continue  # deleted since the folder was listed (prune): gone, not damaged
            except (BootbackError, OSError) as exc:
                what = pointfile.point_name(name, point_id)
                reason = str(exc) if isinstance(exc, BootbackError) else f"{what}: {exc}"
                listing.damaged.append(DamagedPoint(name, point_id, reason))
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
        if not POINT_ID_RE.match(point) or not self.backend.exists(pointfile.point_key(vm, point)):
            raise RestorePointNotFoundError(f"no restore point {vm}@{point} in {self.location}")
        return self.load_point(vm, point, with_chunks)

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
            raise RestorePointNotFoundError(f"no restore points of VM {vm!r} in {self.location}")
        return newest

    def with_chunks(self, point: RestorePoint) -> RestorePoint:
        """``point`` with its chunk lists loaded (itself if they are)."""
        if point.has_chunks:
            return point
        return self.load_point(point.vm, point.id)

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

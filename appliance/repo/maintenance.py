"""Repository maintenance: verify every chunk, prune old restore points, collect unreferenced chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from appliance.errors import BootbackError, IntegrityError, UsageError
from appliance.repo.manifest import DamagedPoint, RestorePoint, check_vm_name
from appliance.repo.packgc import collect_packs
from appliance.repo.repository import Repository

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    bad_chunks: dict[str, str] = field(default_factory=dict)  # chunk id -> what is wrong
    damaged_points: dict[str, list[str]] = field(default_factory=dict)  # "vm@id" -> bad chunk ids
    unreadable_points: dict[str, str] = field(default_factory=dict)  # manifest name -> error
    damaged_indexes: dict[str, str] = field(default_factory=dict)  # index object (packs) -> error

    @property
    def ok(self) -> bool:
        return not (self.bad_chunks or self.unreadable_points or self.damaged_indexes)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "bad_chunks": self.bad_chunks,
            "damaged_points": self.damaged_points,
            "unreadable_points": self.unreadable_points,
            "damaged_indexes": self.damaged_indexes,
        }


def _load_all_points(repo: Repository, report: VerifyReport) -> list[RestorePoint]:
    """Every point whole (summary and chunk lists, each checked); damaged ones go to the report."""
    points = []
    for vm, point_id in repo.point_files():
        try:
            points.append(repo.load_point(vm, point_id))
        except BootbackError as exc:
            report.unreadable_points[f"{vm}@{point_id}"] = str(exc)
    return points


def verify(repo: Repository, progress: Progress | None = None, workers: int = 4) -> VerifyReport:
    """Read and hash-check every chunk any restore point references, and check it has the length each of its
    places needs (as a reader does); report damaged restore points and damaged point files."""
    report = VerifyReport()
    points = _load_all_points(repo, report)
    if repo.store.indexes is not None:
        repo.store.indexes.rebuild()  # every index object read now, each checked whole
        report.damaged_indexes = dict(repo.store.indexes.damaged)
    users: dict[str, dict[int, set[str]]] = {}  # chunk id -> length a place needs -> points needing it
    for p in points:
        for d in p.disks:
            cs, last = d.chunk_size, len(d.chunks) - 1
            tail = d.size - last * cs
            for i, cid in enumerate(d.chunks):
                if cid is not None:
                    users.setdefault(cid, {}).setdefault(cs if i < last else tail, set()).add(p.ref)
    ids = sorted(users)

    def check(cid: str) -> tuple[str, int, str | None]:
        try:
            return cid, len(repo.store.get(cid)), None
        except BootbackError as exc:
            return cid, -1, str(exc)

    with ThreadPoolExecutor(workers) as pool:
        for n, (cid, got, err) in enumerate(pool.map(check, ids), 1):
            report.chunks_checked = n
            for length, refs in sorted(users[cid].items()):
                if err is None and length == got:
                    continue
                report.bad_chunks[cid] = err or f"chunk {cid} holds {got} bytes where {min(refs)} needs {length}"
                for ref in sorted(refs):
                    report.damaged_points.setdefault(ref, []).append(cid)
            if progress:
                progress(n, len(ids))
    return report


@dataclass
class PruneReport:
    deleted_points: list[str] = field(default_factory=list)
    kept_points: list[str] = field(default_factory=list)
    deleted_chunks: int = 0
    freed_bytes: int = 0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def prune(repo: Repository, vm: str, keep: int, wait: bool = True, dry_run: bool = False) -> PruneReport:
    """Keep the newest ``keep`` restore points of ``vm``, delete the rest, then collect garbage. Refused, before
    anything is deleted, while any point file is damaged (its chunks, and which points are newest, are unknown)."""
    if keep < 1:
        raise UsageError(f"--keep must be at least 1, got {keep}")
    check_vm_name(vm)
    listing = repo.list_points()  # every VM: garbage collection below needs every point
    if listing.damaged:
        raise _damaged(repo, "prune", listing.damaged)
    points = [p for p in listing.points if p.vm == vm]
    report = PruneReport()
    doomed = points[: max(0, len(points) - keep)]
    report.kept_points = [p.ref for p in points[len(doomed) :]]
    report.deleted_points = [p.ref for p in doomed]
    if dry_run:
        return report
    report.deleted_chunks, report.freed_bytes = collect_garbage(repo, wait=wait, doomed=doomed)
    return report


def collect_garbage(repo: Repository, wait: bool = True, doomed: Sequence[RestorePoint] = ()) -> tuple[int, int]:
    """Delete the ``doomed`` points, then chunks no restore point references and leftovers of crashed backups;
    returns (chunks, bytes) freed. Under the exclusive lock, so no running backup loses a deduplicated chunk; a
    chunk younger than the store's grace period is kept even so (an S3 writer the leases cannot see)."""
    with repo.exclusive(wait=wait):
        listing = repo.list_points(with_chunks=True)
        if listing.damaged:  # nothing is collected while a point's chunks cannot be known
            raise _damaged(repo, "collect garbage in", listing.damaged)
        gone = {p.ref for p in doomed}
        for p in doomed:
            repo.delete_point(p)
        live: set[str] = set()
        for p in listing.points:
            if p.ref not in gone:
                for d in p.disks:
                    live.update(c for c in d.chunks if c is not None)
        deleted = freed = 0
        before = repo.backend.collectable_before()
        for info in list(repo.store.iter_chunks()):
            cid = info.key.rsplit("/", 1)[-1]
            if cid not in live and info.mtime < before:
                repo.store.delete(cid)
                freed += info.size
                deleted += 1
        if repo.packed:
            packed = collect_packs(repo, live, before)
            deleted += packed.dead_chunks
            freed += packed.freed_bytes
        repo.clean_tmp()
        repo.chunk_cache.clear()
    return deleted, freed


def _damaged(repo: Repository, what: str, damaged: list[DamagedPoint]) -> IntegrityError:
    reasons = "; ".join(d.error for d in damaged)
    return IntegrityError(
        f"cannot {what} {repo.location}: {len(damaged)} restore point file(s) cannot be read, so the chunks they need "
        f"are unknown and nothing was deleted ({reasons}); restore the file from a copy, or remove it if its "
        "point is lost ('bootback verify' lists them)"
    )

"""Garbage collection of pack objects (docs/repository-format.md, "Pack objects").

Called by ``maintenance.collect_garbage`` under the repository's exclusive right, with the set of live chunk
ids. A pack none of whose chunks is live is deleted; a pack with more than ``REPACK_DEAD`` of its bytes dead has
its live chunk objects copied, each verified, into new packs. Order, so a crash at any step loses nothing:

1. new packs (repacked chunks) are stored;
2. one new index object naming every surviving record is stored;
3. the index objects it replaces are deleted;
4. dead and repacked packs are deleted.

A crash after 2 leaves duplicate records (old and new index): harmless, either names a verified copy. Anything
younger than the grace period (``collectable_before``) is left alone: an index object, and every pack it names,
and every pack, since a writer the leases cannot see may still commit a point naming them.

Memory: the records of the old index objects are held while collecting (~150 bytes each: ~150 MB for a million
chunks). Repositories far larger than that want an external sort here; not yet needed.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

from appliance.errors import BootbackError
from appliance.repo import packindex
from appliance.repo.packindex import RECORD, PackRecord
from appliance.repo.packs import INDEX_PREFIX, PACK_PREFIX, PackWriter, is_index_key, is_pack_key, write_indexes
from appliance.repo.repository import Repository
from appliance.repo.store import ChunkStore

REPACK_DEAD = 0.25  # a pack with more dead bytes than this share is rewritten; fewer: not worth the copy


@dataclass
class PackCollection:
    """What a pack collection did."""

    dead_chunks: int = 0  # chunk objects no point needs, now gone from every index
    deleted_packs: int = 0
    repacked_packs: int = 0
    freed_bytes: int = 0  # stored bytes deleted minus stored bytes written
    kept_damaged: list[str] = field(default_factory=list)  # packs left whole: a live chunk in them failed its check


def collect_packs(repo: Repository, live: Set[str], before: float) -> PackCollection:
    """Delete or repack the packs of ``repo`` whose chunks are not in ``live`` (hex ids), leaving everything
    modified at or after ``before`` alone. Call under ``repo.exclusive()``."""
    backend, store, report = repo.backend, repo.store, PackCollection()
    packs = {info.key: info for info in backend.list(PACK_PREFIX) if is_pack_key(info.key)}
    old_indexes: list[str] = []
    keep: dict[bytes, PackRecord] = {}  # live chunk -> the record kept for it
    protected: set[str] = {key for key, info in packs.items() if info.mtime >= before}
    seen: set[bytes] = set()
    spare: dict[bytes, list[PackRecord]] = {}  # live chunk -> its other records (two backups raced, a crashed GC)
    for info in backend.list(INDEX_PREFIX):
        if not is_index_key(info.key):
            continue
        payload = packindex.decode_index(
            backend.get(info.key, f"index {info.key}", packindex.MAX_INDEX_OBJECT),
            store.envelope,
            info.key,
            store.max_object,
        )
        young = info.mtime >= before
        if not young:
            old_indexes.append(info.key)
        for i in range(0, len(payload), RECORD.size):
            rec = PackRecord(*RECORD.unpack_from(payload, i))
            if young:
                protected.add(rec.pack_key)  # its writer may still commit a point naming these chunks
                continue
            seen.add(rec.chunk)
            if rec.chunk.hex() in live and rec.pack_key in packs:
                if rec.chunk in keep:
                    if rec != keep[rec.chunk]:  # the same place twice (a crash after step 2): nothing to check
                        spare.setdefault(rec.chunk, []).append(rec)
                else:
                    keep[rec.chunk] = rec
    for chunk, others in spare.items():  # several copies: the one kept must be intact, the others' packs may go
        keep[chunk] = next((r for r in (keep[chunk], *others) if _intact(store, r)), keep[chunk])
    report.dead_chunks = len(seen - keep.keys())
    live_bytes: dict[str, int] = {}
    for rec in keep.values():
        live_bytes[rec.pack_key] = live_bytes.get(rec.pack_key, 0) + rec.length
    doomed = [key for key in packs if key not in protected and not live_bytes.get(key)]
    sparse = [key for key in packs if key not in protected and _mostly_dead(packs[key].size, live_bytes.get(key, 0))]
    written = _repack(repo, sparse, keep, report)
    if old_indexes and (doomed or sparse or report.dead_chunks or len(old_indexes) > 1):  # else: nothing to do
        write_indexes(list(keep.values()), store.envelope, backend.put)  # 2: before anything is deleted
        for key in old_indexes:  # 3
            backend.delete(key)
    for key in doomed + [k for k in sparse if k not in report.kept_damaged]:  # 4
        backend.delete(key)
        report.freed_bytes += packs[key].size
    report.deleted_packs = len(doomed)
    report.freed_bytes -= written
    if store.indexes is not None:
        store.indexes.rebuild()
    return report


def _intact(store: ChunkStore, rec: PackRecord) -> bool:
    """Whether the chunk object ``rec`` places reads back and checks as its chunk."""
    name = f"chunk {rec.chunk.hex()} (one of several copies)"
    try:
        store.open_object(rec.chunk.hex(), store.read_packed(rec, name), name)
    except (BootbackError, FileNotFoundError):
        return False
    return True


def _mostly_dead(size: int, live: int) -> bool:
    return live > 0 and size - live > REPACK_DEAD * size


def _repack(repo: Repository, sparse: list[str], keep: dict[bytes, PackRecord], report: PackCollection) -> int:
    """Copy the live chunks of the ``sparse`` packs into new packs, each verified first, and point their
    records in ``keep`` at the copies; returns the bytes written. A pack with a live chunk that fails its
    check is left whole (named in the report): its other copies stay where ``verify`` can find them."""
    if not sparse:
        return 0
    store, written = repo.store, 0
    by_pack: dict[str, list[PackRecord]] = {}
    for rec in keep.values():
        if rec.pack_key in sparse:
            by_pack.setdefault(rec.pack_key, []).append(rec)

    def put(key: str, body: bytes) -> None:
        nonlocal written
        repo.backend.put(key, body)  # 1: durable before any index names it
        written += len(body)

    writer = PackWriter(put)
    for pack in sparse:
        copies = []
        try:
            for rec in sorted(by_pack.get(pack, []), key=lambda r: r.offset):
                cid = rec.chunk.hex()
                name = f"chunk {cid} (repacking {pack})"
                blob = store.read_packed(rec, name)
                store.open_object(cid, blob, name)
                copies.append((rec.chunk, blob))
        except (BootbackError, FileNotFoundError):
            report.kept_damaged.append(pack)
            continue
        for chunk, blob in copies:
            writer.add(chunk, blob)
        report.repacked_packs += 1
    writer.flush()
    for rec in writer.iter_records():
        keep[rec.chunk] = rec
    return written

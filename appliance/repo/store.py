"""The chunk store: hash -> bytes, content-addressed, zstd-compressed, written atomically.

It knows nothing of VMs or restore points (borg's Repository vs Archive split), nor where its objects live: a
chunk is one object, ``chunks/<first two hex digits>/<hex digest>``, framed by ``objects``, kept by an
``ObjectStore`` (a directory or an S3 bucket, ``backends``). A backup stages chunks in its writer's batch;
the batch's ``publish`` makes them durable and visible before a restore point that references them is committed,
so a crash leaves either no chunk or a whole one (each backend's docstring tells how).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

from appliance.errors import IntegrityError, UnsupportedFormatError
from appliance.repo import objects
from appliance.repo.backends import ChunkBatch, ObjectInfo, ObjectStore
from appliance.repo.backends.local import DIR_MODE, FILE_MODE
from appliance.repo.keys import RepoKey
from appliance.repo.packindex import PackRecord
from appliance.repo.packs import IndexSet, PackingBatch, check_pack_record

__all__ = ["DIR_MODE", "FILE_MODE", "ChunkStore", "chunk_id"]  # the modes: for older importers

# A chunk whose samples (start, middle, end) do not shrink at the repository's level is random or already
# compressed or encrypted guest data: level 3 would spend ~0.5 ms per MiB to gain nothing, the fastest level
# less (the backup's client CPU is what limits it on S3, docs/benchmarks.md). Either way it is one zstd frame,
# read the same: the format does not change.
SAMPLE_BYTES = 16 * 1024
INCOMPRESSIBLE_RATIO = 0.97
FASTEST_LEVEL = -1000

HASH_NAME = "sha256"  # SHA-NI makes it the fastest cryptographic hash on current x86 (~1.9 GB/s here)
DIGEST_HEX_LEN = 64


def chunk_id(data: bytes | memoryview) -> str:
    """The id of a chunk in an unencrypted repository (an encrypted one uses its key's ``RepoKey.chunk_id``)."""
    return hashlib.sha256(data).hexdigest()


class ChunkStore:
    """Content-addressed chunk objects under ``chunks/`` of ``backend``; safe for many threads and processes."""

    def __init__(
        self,
        backend: ObjectStore,
        max_chunk: int,
        compression_level: int = 3,
        key: RepoKey | None = None,
        packs: bool = False,
    ) -> None:
        """``max_chunk``: the repository's chunk size; a chunk file claiming more is refused unread. ``key``: an
        encrypted repository's key (chunks are named by its keyed hash and sealed by ``objects.Envelope``).
        ``packs``: new chunks go into pack objects (``packs``), found through index objects."""
        self.backend = backend
        self.root = backend.local_path  # a local repository's directory (tests, benchmarks); None on S3
        self.chunks_dir = self.root / "chunks" if self.root else None
        self.max_chunk = max_chunk
        self.envelope = objects.Envelope(key.aead if key else None)
        self.chunk_id = key.chunk_id if key else chunk_id
        self._max_inner = objects.max_object_size(max_chunk)
        self._max_file = self._max_inner + self.envelope.overhead
        self._level = compression_level
        self._local = threading.local()
        self.indexes = IndexSet(backend, self.envelope, self._max_file) if packs else None

    def batch(self, inner: ChunkBatch) -> ChunkBatch:
        """A backup's batch: ``inner`` (the store's own), or packs staged through it in a repository with packs."""
        return inner if self.indexes is None else PackingBatch(inner, self.indexes, self.envelope)

    # zstd contexts are not thread-safe; one per thread is cheap.
    def _compressor(self, fastest: bool = False) -> zstandard.ZstdCompressor:
        """This thread's compressor at the repository's level, or at zstd's fastest."""
        name = "f" if fastest else "c"
        c = getattr(self._local, name, None)
        if c is None:
            c = zstandard.ZstdCompressor(level=FASTEST_LEVEL if fastest else self._level)
            setattr(self._local, name, c)
        return c

    def _compress(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` as a zstd frame: at the repository's level, or the fastest when samples say it will not shrink."""
        c = self._compressor()
        n = len(data)
        if n >= 4 * SAMPLE_BYTES:
            view, mid = memoryview(data), (n - SAMPLE_BYTES) // 2
            sample = b"".join((view[:SAMPLE_BYTES], view[mid : mid + SAMPLE_BYTES], view[n - SAMPLE_BYTES :]))
            if len(c.compress(sample)) > len(sample) * INCOMPRESSIBLE_RATIO:
                c = self._compressor(fastest=True)
        return c.compress(data)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    @staticmethod
    def key(cid: str) -> str:
        return f"chunks/{cid[:2]}/{cid}"

    def path(self, cid: str) -> Path:
        """The file of chunk ``cid`` in a local repository."""
        if self.root is None:
            raise ValueError(f"{self.backend.location} is not a directory")  # a caller's bug
        return self.root / self.key(cid)

    def exists(self, cid: str) -> bool:
        return self.backend.exists(self.key(cid))

    def stage(self, cid: str, data: bytes | bytearray | memoryview, batch: ChunkBatch) -> int | None:
        """Write chunk ``cid`` into the writer's ``batch`` (durable and visible once the batch is published).
        Returns the bytes it takes in the repository, or None when the repository already has the chunk."""
        if batch.has(self.key(cid)):
            return None
        blob = self.envelope.wrap(
            objects.CHUNK_MAGIC,
            objects.pack(objects.CHUNK_MAGIC, data, self._compress(data)),
            cid.encode(),
        )
        batch.stage(self.key(cid), blob)
        return len(blob)

    def publish(self, batch: ChunkBatch) -> None:
        """Every chunk staged in ``batch`` durable and visible: a chunk that is visible is always whole."""
        batch.publish()

    def get(self, cid: str, context: str = "") -> bytes:
        """Return the chunk's bytes, verified against its hash; ``context`` names who asked (a restore point)."""
        where = f" (needed by {context})" if context else ""
        name = f"chunk {cid}{where}"
        return self.open_object(cid, self._fetch(cid, name, where), name, where)

    def open_object(self, cid: str, blob: bytes | memoryview, name: str, where: str = "") -> bytes:
        """The bytes of chunk ``cid`` from its stored object ``blob`` (a view into a run of a pack: not copied),
        checked as every read checks them: envelope, framing, bounds, hash. ``name`` says what it is in errors."""
        blob = self.envelope.unwrap(objects.CHUNK_MAGIC, blob, name, cid.encode(), self._max_inner)
        data = objects.unpack(objects.CHUNK_MAGIC, blob, name, self._decompressor(), self.max_chunk)
        if self.chunk_id(data) != cid:
            raise IntegrityError(f"chunk {cid} is corrupt: its content does not match its hash{where}")
        return data

    @property
    def max_object(self) -> int:
        """The most bytes a stored chunk object may hold."""
        return self._max_file

    def _fetch(self, cid: str, name: str, where: str) -> bytes:
        """The stored object of chunk ``cid``: from its pack when an index names one, else loose."""
        if self.indexes is not None:
            raw = bytes.fromhex(cid)  # a point's chunk ids are checked hex when it is loaded
            started = time.monotonic()
            rec = self.indexes.find(raw)
            if rec is not None:
                try:
                    return self.read_packed(rec, name)
                except FileNotFoundError:
                    pass
                moved = self.indexes.moved(rec, started)  # a garbage collection repacked it meanwhile
                if moved is not None:
                    with contextlib.suppress(FileNotFoundError):
                        return self.read_packed(moved, name)
        try:
            return self.backend.get(self.key(cid), name, self._max_file)
        except FileNotFoundError:
            damaged = self.indexes.damaged if self.indexes is not None else {}
            why = f"; {len(damaged)} index object(s) cannot be read: {next(iter(damaged.values()))}" if damaged else ""
            raise IntegrityError(f"chunk {cid} is missing{where}{why}") from None

    def locate(self, cid: str) -> PackRecord | None:
        """Where chunk ``cid`` sits in a pack, as the indexes loaded say (no reload); None if not packed."""
        return self.indexes.find(bytes.fromhex(cid), reload=False) if self.indexes is not None else None

    def get_span(self, cids: list[str], recs: list[PackRecord], context: str = "") -> list[bytes | None]:
        """The chunks ``cids`` whose objects lie in one pack (``recs``, in the pack's order, apart), fetched by one
        ranged read (the bytes between them are dropped) and each checked as ``get`` checks it: None for one
        that fails its check. A read that fails raises. Either way callers read those chunks alone (``get``),
        which names what is wrong with each."""
        first, last = recs[0], recs[-1]
        if any(r.pack != first.pack or r.offset < p.offset + p.length for p, r in itertools.pairwise(recs)):
            raise ValueError("a span's records must lie apart, in order, in one pack")  # a caller's bug
        where = f" (needed by {context})" if context else ""
        key, end = first.pack_key, last.offset + last.length
        for rec in recs:
            check_pack_record(rec, self._max_file, f"chunk {rec.chunk.hex()}{where}")
        blob, size = self.backend.read_range(key, first.offset, end - 1, f"chunks {cids[0]}.. in {key}{where}")
        if len(blob) != end - first.offset:
            raise IntegrityError(f"{key} holds {size} bytes, the index places chunks up to byte {end}")
        view, out = memoryview(blob), []
        for cid, rec in zip(cids, recs, strict=True):
            at = rec.offset - first.offset
            name = f"chunk {cid}{where}"
            try:
                out.append(self.open_object(cid, view[at : at + rec.length], name, where))
            except (IntegrityError, UnsupportedFormatError):
                out.append(None)
        return out

    def read_packed(self, rec: PackRecord, name: str) -> bytes:
        """The bytes an index record places in a pack: exactly ``rec.length`` of them, or IntegrityError."""
        check_pack_record(rec, self._max_file, name)
        key = rec.pack_key
        data, size = self.backend.read_range(key, rec.offset, rec.offset + rec.length - 1, f"{name} in {key}")
        if len(data) != rec.length:
            raise IntegrityError(
                f"{name}: the index places it at bytes {rec.offset}-{rec.offset + rec.length - 1} of {key}, "
                + (f"which holds {size} bytes" if size >= 0 else "which is shorter")
            )
        return data

    def iter_chunks(self) -> Iterator[ObjectInfo]:
        """Every chunk object (``info.key`` ends in its id), with its stored size and age."""
        for info in self.backend.list("chunks/"):
            cid = info.key.rsplit("/", 1)[-1]
            if len(cid) == DIGEST_HEX_LEN and info.key == self.key(cid):
                yield info

    def iter_ids(self) -> Iterator[str]:
        """Every chunk's id (a symlinked folder of a local repository is not walked: garbage collection deletes
        what this lists, and must never delete outside the repository)."""
        for info in self.iter_chunks():
            yield info.key.rsplit("/", 1)[-1]

    def delete(self, cid: str) -> None:
        self.backend.delete(self.key(cid))

"""Index objects of pack objects, and the merged lookup of many of them (docs/repository-format.md, "Pack objects").

An index object (``index/<writer>-<n>.idx``) says where each of a backup's chunk objects sits: a sealed
(version 2) object of kind ``BBIX`` whose payload is a u32 count, then that many ``RECORD``s sorted by chunk id
(32-byte chunk id, 16-byte pack id, u64 offset, u32 length), zstd-compressed, wrapped by the repository's
envelope with the key as associated data (an index moved to another name fails authentication). An index is
a hint, never trusted for bytes, but it is still hostile input: ``decode_index`` checks every bound before it
allocates and refuses anything out of order or out of range with one ``IntegrityError`` naming the key.

``PackIndex`` holds the records of every index object of a repository, sorted by chunk id, in an unlinked
temporary file mapped read-only (as ``backends/chunkids.py``): 60 bytes of disk per chunk and no process
memory, however large the repository. ``add`` merges a sorted payload into a new file and swaps the mapping,
so a lookup in another thread sees the old whole or the new one, never a half-written file.

The merge streams both sides in blocks of ``_BLOCK`` records: where the two sides do not overlap, the bytes are
copied as they are; where they do, the new block's copies of ids the old block holds are dropped (a set
intersection) and the whole records sorted (two sorted runs: one linear merge), all in C; where one side has
16 times fewer records, each of them is placed by bisection and the runs between are copied. Measured here
(Debian 12, 2 cores shared with other jobs, random ids, CPU seconds): a 1 M-record payload added to an empty
index in 0.17 s, to a 1 M-record index in 1.3 s (the same 1 M again, all duplicates: 2.0 s), 1 k records into
2 M in 0.12 s; ``find`` 10-17 us per lookup at 2 M records (hits and misses); ``decode_index`` of 1 M records
0.6 s, ``encode_index`` 2.6 s.
"""

from __future__ import annotations

import io
import mmap
import operator
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import IO

import zstandard

from appliance.errors import IntegrityError
from appliance.repo import objects

RECORD = struct.Struct(">32s16sQI")  # chunk id, pack id, offset in the pack, length of the chunk object
INDEX_MAGIC = b"BBIX"
MAX_RECORDS = 1 << 20  # per index object: 60 MiB of records
COMPRESSION_LEVEL = 3
MAX_END = 1 << 63  # offset + length: beyond any object a store holds, and what a signed 64-bit range allows

_COUNT = struct.Struct(">I")
_MAX_RAW = _COUNT.size + MAX_RECORDS * RECORD.size
_MAX_INNER = objects.SEALED_HEADER_SIZE + objects.stored_bound(_MAX_RAW)
MAX_INDEX_OBJECT = _MAX_INNER + objects.ENVELOPE_OVERHEAD  # the largest stored index object
CHUNK_SIZE = 32
PACK_ID_SIZE = 16

_CHUNK = struct.Struct(f">{CHUNK_SIZE}s{RECORD.size - CHUNK_SIZE}x")  # a record's chunk id
_PLACE = struct.Struct(f">{CHUNK_SIZE + PACK_ID_SIZE}xQI")  # a record's offset and length
_WHOLE = struct.Struct(f">{RECORD.size}s")  # a record as bytes
_BLOCK = 1 << 16  # records per merge step: ~4 MB of bytes, ~15 MB of Python objects
_SPARSE = 16  # a merge step whose one side has 16 times fewer records bisects them in
_WRITER_RE = re.compile(r"[0-9A-Za-z_.-]+")


@dataclass(frozen=True, slots=True)
class PackRecord:
    """Where one chunk object sits: ``length`` bytes at ``offset`` of pack ``pack`` (16 raw bytes)."""

    chunk: bytes
    pack: bytes
    offset: int
    length: int

    @property
    def pack_key(self) -> str:
        return pack_key(self.pack)

    @property
    def chunk_hex(self) -> str:
        return self.chunk.hex()


def pack_key(pack: bytes) -> str:
    """The key of pack ``pack`` (16 raw bytes): ``packs/<first two hex digits>/<32 hex digits>``."""
    if len(pack) != PACK_ID_SIZE:
        raise ValueError(f"a pack id has {PACK_ID_SIZE} bytes, not {len(pack)}")
    h = pack.hex()
    return f"packs/{h[:2]}/{h}"


def new_pack_id() -> bytes:
    """A fresh random pack id: 128 bits, so writers that never talk to each other never collide."""
    return os.urandom(PACK_ID_SIZE)


def index_key(writer: str, seq: int) -> str:
    """The key of index object ``seq`` (0, 1, ...) of writer ``writer`` (a uuid's hex)."""
    if not _WRITER_RE.fullmatch(writer) or seq < 0:
        raise ValueError(f"bad index name parts {writer!r}, {seq}")
    return f"index/{writer}-{seq}.idx"


# --- the index object ------------------------------------------------------------------------------------------


def encode_index(records: Iterable[PackRecord], envelope: objects.Envelope, key: str) -> bytes:
    """The stored index object ``key`` naming ``records`` (sorted here; of several records of one chunk id the
    first is kept). ValueError for more than MAX_RECORDS distinct chunks or a record ``decode_index`` refuses."""
    by_chunk: dict[bytes, PackRecord] = {}
    for rec in records:
        if len(rec.chunk) != CHUNK_SIZE or len(rec.pack) != PACK_ID_SIZE:
            raise ValueError(f"record {rec!r}: ids must have {CHUNK_SIZE} and {PACK_ID_SIZE} bytes")
        if rec.length < 1 or rec.offset < 0 or rec.offset + rec.length > MAX_END:
            raise ValueError(f"record of chunk {rec.chunk.hex()}: offset {rec.offset}, length {rec.length}")
        by_chunk.setdefault(rec.chunk, rec)
        if len(by_chunk) > MAX_RECORDS:
            raise ValueError(f"{key}: more than {MAX_RECORDS} records in one index object")
    ordered = sorted(by_chunk.values(), key=operator.attrgetter("chunk"))
    raw = _COUNT.pack(len(ordered)) + b"".join(RECORD.pack(r.chunk, r.pack, r.offset, r.length) for r in ordered)
    compressed = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress(raw)
    inner = objects.seal(INDEX_MAGIC, raw, compressed)
    return envelope.wrap(INDEX_MAGIC, inner, key.encode())


def decode_index(blob: bytes, envelope: objects.Envelope, key: str, max_length: int) -> bytes:
    """The records of the stored index object ``key`` (count * RECORD.size bytes, sorted by chunk id, each
    checked: a length of 1 to ``max_length`` bytes, the largest chunk object), or IntegrityError naming ``key``."""
    name = f"index {key}"
    if len(blob) > MAX_INDEX_OBJECT:
        raise IntegrityError(f"{name}: {len(blob)} bytes, an index object holds at most {MAX_INDEX_OBJECT}")
    inner = envelope.unwrap(INDEX_MAGIC, blob, name, key.encode(), _MAX_INNER)
    f = io.BytesIO(inner)
    raw = objects.read_sealed(f, INDEX_MAGIC, name, _MAX_RAW, zstandard.ZstdDecompressor())
    if f.tell() != len(inner):
        raise IntegrityError(f"{name}: {len(inner) - f.tell()} bytes after the sealed object")
    if len(raw) < _COUNT.size:
        raise IntegrityError(f"{name}: {len(raw)} payload bytes, too short for a record count")
    (count,) = _COUNT.unpack_from(raw)
    if count > MAX_RECORDS:
        raise IntegrityError(f"{name}: {count} records, an index object holds at most {MAX_RECORDS}")
    if count * RECORD.size != len(raw) - _COUNT.size:
        raise IntegrityError(f"{name}: says {count} records but holds {len(raw) - _COUNT.size} bytes of records")
    payload = raw[_COUNT.size :]
    _check_records(payload, name, max_length)
    return payload


def _check_records(payload: bytes, name: str, max_length: int) -> None:
    """Chunk ids strictly increasing, every place inside its bounds. Scanned in blocks (bounded memory) by C
    loops; the record at fault is looked for only on failure."""
    bad = _first_unsorted(payload)
    if bad is not None:
        prev, this = (payload[k * RECORD.size : k * RECORD.size + CHUNK_SIZE] for k in (bad - 1, bad))
        what = "repeats" if this == prev else "is smaller than"
        raise IntegrityError(f"{name}: record {bad}: chunk {this.hex()} {what} the one before: not sorted")
    view = memoryview(payload)
    for start in range(0, len(payload), _BLOCK * RECORD.size):
        places = list(_PLACE.iter_unpack(view[start : start + _BLOCK * RECORD.size]))
        lengths = list(map(operator.itemgetter(1), places))
        if min(lengths) >= 1 and max(lengths) <= max_length and max(map(sum, places)) <= MAX_END:
            continue
        for k, (offset, length) in enumerate(places):
            i = start // RECORD.size + k
            chunk = payload[i * RECORD.size : i * RECORD.size + CHUNK_SIZE].hex()
            if not 1 <= length <= max_length:
                raise IntegrityError(
                    f"{name}: record {i} (chunk {chunk}): length {length}, a chunk object has 1 to {max_length}"
                )
            if offset + length > MAX_END:
                raise IntegrityError(f"{name}: record {i} (chunk {chunk}): offset {offset} + length {length} > 2^63")


def _first_unsorted(records: bytes | memoryview) -> int | None:
    """The first record whose chunk id is not greater than the one before, or None: all strictly sorted."""
    view, count = memoryview(records), len(records) // RECORD.size
    for start in range(0, count, _BLOCK):
        end = min(start + _BLOCK + 1, count)  # one record of overlap with the next block
        ids = [c for (c,) in _CHUNK.iter_unpack(view[start * RECORD.size : end * RECORD.size])]
        if not all(map(operator.lt, ids, islice(ids, 1, None))):
            return start + next(k for k in range(1, len(ids)) if ids[k] <= ids[k - 1])
    return None


# --- the merged lookup -----------------------------------------------------------------------------------------


class _Sorted:
    """One immutable generation of a PackIndex: ``count`` sorted records in an unlinked file, mapped. Closed
    when the last reference goes (a lookup in another thread may still hold it after ``add`` replaced it)."""

    def __init__(self, file: IO[bytes] | None, count: int) -> None:
        self.file = file
        self.count = count
        self.map: mmap.mmap | None = None
        if file is not None and count:
            self.map = mmap.mmap(file.fileno(), count * RECORD.size, access=mmap.ACCESS_READ)

    def chunk(self, i: int) -> bytes:
        assert self.map is not None
        return self.map[i * RECORD.size : i * RECORD.size + CHUNK_SIZE]

    def upper(self, lo: int, hi: int, chunk: bytes) -> int:
        """The first position in [lo, hi) whose chunk id is greater than ``chunk`` (hi if none)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if self.chunk(mid) <= chunk:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.file is not None:
            self.file.close()
            self.file = None
        self.count = 0

    def __del__(self) -> None:
        self.close()


class _Payload:
    """A payload being added, with the lookups the merge needs (same shape as ``_Sorted``)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.map = memoryview(data)
        self.count = len(data) // RECORD.size

    def chunk(self, i: int) -> bytes:
        return bytes(self.map[i * RECORD.size : i * RECORD.size + CHUNK_SIZE])

    upper = _Sorted.upper


class PackIndex:
    """Every record of many index objects, looked up by chunk id; thread-safe (``add`` calls are serialized,
    ``find`` never waits for them)."""

    def __init__(self) -> None:
        self._current = _Sorted(None, 0)
        self._add_lock = threading.Lock()

    def __len__(self) -> int:
        return self._current.count

    def add(self, records: bytes | memoryview) -> None:
        """Merge ``records`` (a ``decode_index`` payload: sorted, distinct chunk ids) into the index; of a chunk id
        already present the record added first is kept. ValueError if ``records`` is not such a payload."""
        if len(records) % RECORD.size:
            raise ValueError(f"{len(records)} bytes are not whole {RECORD.size}-byte records")
        if _first_unsorted(records) is not None:
            raise ValueError("pack index records are not strictly sorted by chunk id")
        new = _Payload(records)
        if not new.count:
            return
        with self._add_lock:
            old = self._current
            file = tempfile.TemporaryFile(prefix="bootback-pack-index-")  # noqa: SIM115 - owned by _Sorted
            try:
                count = _merge(old, new, file)
                file.flush()
                merged = _Sorted(file, count)
            except BaseException:
                file.close()
                raise
            self._current = merged  # one reference swap: a lookup sees the old whole or the new one

    def find(self, chunk: bytes) -> PackRecord | None:
        """The record of chunk ``chunk`` (32 raw bytes), or None."""
        cur = self._current  # held for the whole search: an add meanwhile does not close it under us
        if not cur.count or len(chunk) != CHUNK_SIZE:
            return None
        i = cur.upper(0, cur.count, chunk) - 1
        if i < 0 or cur.chunk(i) != chunk:
            return None
        assert cur.map is not None
        return PackRecord(*RECORD.unpack_from(cur.map, i * RECORD.size))

    def records(self) -> Iterator[PackRecord]:
        """Every record, in chunk-id order (of the index as it was when the iteration started)."""
        cur = self._current
        for start in range(0, cur.count, _BLOCK):
            assert cur.map is not None
            end = min(start + _BLOCK, cur.count)
            block = cur.map[start * RECORD.size : end * RECORD.size]
            for fields in RECORD.iter_unpack(block):
                yield PackRecord(*fields)

    def close(self) -> None:
        with self._add_lock:
            cur, self._current = self._current, _Sorted(None, 0)
        cur.close()


def _merge(old: _Sorted, new: _Payload, out: IO[bytes]) -> int:
    """Write the records of ``old`` and ``new`` into ``out`` sorted, ``old``'s record winning a tie; returns the
    count. Each step takes at most _BLOCK records of one side up to a chunk id and everything of the other side
    up to the same id; where only one side has records, they are copied as they are."""
    i = j = written = 0
    size = RECORD.size
    while i < old.count or j < new.count:
        if i == old.count or j == new.count:
            rest, lo, n = (new, j, new.count) if i == old.count else (old, i, old.count)
            assert rest.map is not None
            out.write(rest.map[lo * size : n * size])
            return written + n - lo
        ie, je = min(i + _BLOCK, old.count), min(j + _BLOCK, new.count)
        old_last, new_last = old.chunk(ie - 1), new.chunk(je - 1)
        if old_last <= new_last:
            je = new.upper(j, je, old_last)
        else:
            ie = old.upper(i, ie, new_last)
        assert old.map is not None
        old_block, new_block = old.map[i * size : ie * size], new.map[j * size : je * size]
        if not old_block or not new_block:
            out.write(old_block or new_block)
            written += (ie - i) + (je - j)
        elif (je - j) * _SPARSE < ie - i or (ie - i) * _SPARSE < je - j:
            written += _insert(old, i, ie, new, j, je, out)
        else:
            merged = _merge_blocks(old_block, new_block)
            out.write(b"".join(merged))
            written += len(merged)
        i, j = ie, je
    return written


def _merge_blocks(old: bytes | memoryview, new: bytes | memoryview) -> list[bytes]:
    """The records of two sorted blocks, sorted; of a chunk id in both, ``old``'s record. Once the new copies of
    such ids are dropped every id is distinct, so sorting whole records (memcmp) sorts by chunk id; two sorted
    runs make the sort one linear merge."""
    first = operator.itemgetter(0)
    both = set(map(first, _CHUNK.iter_unpack(new))).intersection(map(first, _CHUNK.iter_unpack(old)))
    records = list(map(first, _WHOLE.iter_unpack(old)))
    if both:
        records += [r for r in map(first, _WHOLE.iter_unpack(new)) if r[:CHUNK_SIZE] not in both]
    else:
        records += map(first, _WHOLE.iter_unpack(new))
    records.sort()
    return records


def _insert(old: _Sorted, i: int, ie: int, new: _Payload, j: int, je: int, out: IO[bytes]) -> int:
    """Merge step where one side has few records: each of them is placed by bisection in the other side, whose
    runs between them are copied as they are. Returns the records written."""
    few_is_new = je - j < ie - i
    few, lo, hi = (new, j, je) if few_is_new else (old, i, ie)
    many, pos, end = (old, i, ie) if few_is_new else (new, j, je)
    assert few.map is not None and many.map is not None
    size, written = RECORD.size, 0
    for k in range(lo, hi):
        chunk = few.chunk(k)
        p = many.upper(pos, end, chunk)
        tie = p > pos and many.chunk(p - 1) == chunk
        run_end = p - 1 if tie else p
        out.write(many.map[pos * size : run_end * size])
        src, at = (many, run_end) if tie and few_is_new else (few, k)  # a tie: the old record wins
        out.write(src.map[at * size : (at + 1) * size])
        written += run_end - pos + 1
        pos = p
    out.write(many.map[pos * size : end * size])
    return written + end - pos

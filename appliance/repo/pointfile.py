"""Restore point files, ``points/<vm>/<id>.point``: encoding, and decoding with every check applied.

Format 2 (written now) is two sealed objects (``objects.seal``: length, SHA-256) back to back:
1. the *summary* (``BBRP``): every fact of the point but its chunk lists, plus the length and SHA-256 of (2);
2. the *chunk lists* (``BBCL``): one JSON list of chunk ids per disk.
Listing a repository reads only (1), a few hundred bytes per point whatever the disks' size; (2) is read when a
disk is opened, or by verify and garbage collection. Format 1 (one unsealed ``BBRP`` object holding everything)
is still read, with the same field checks but no checksum.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import zstandard

from appliance.errors import IntegrityError
from appliance.repo import objects, safefile
from appliance.repo.manifest import (
    RestorePoint,
    check_chunks,
    check_point,
    chunk_lists_bound,
    parse_chunk_lists,
    parse_summary,
    parse_v1,
    point_ref,
)

MAX_SUMMARY_BYTES = 16 << 20  # a summary holds the .vmx text, the source and stats: kilobytes in practice
_V1_MAX_BYTES = (1 << 32) - 1  # a format-1 header's length field is a u32


def encode(point: RestorePoint) -> bytes:
    """The file for ``point`` (its chunk lists must be loaded)."""
    cctx = zstandard.ZstdCompressor(level=3)
    chunks = point.chunk_lists_json()
    summary = point.summary_json(len(chunks), hashlib.sha256(chunks).hexdigest())
    return objects.seal(objects.POINT_MAGIC, summary, cctx.compress(summary)) + objects.seal(
        objects.CHUNK_LIST_MAGIC, chunks, cctx.compress(chunks)
    )


def point_name(path: Path) -> str:
    return f"restore point {point_ref(path.parent.name, path.stem)}"


def _open_regular(path: Path, name: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (``safefile``): a FIFO would block a listing
    forever, a symlink or device is no point file."""
    fd, _size = safefile.open_regular(path, name)
    return os.fdopen(fd, "rb")


def load(path: Path, chunk_size: int, with_chunks: bool = True) -> RestorePoint:
    """The point stored at ``path``, checked against its file name and the repository's ``chunk_size``; without
    ``with_chunks`` only its summary is read (a format-1 file is always read whole)."""
    vm, point_id, name = path.parent.name, path.stem, point_name(path)
    dctx = zstandard.ZstdDecompressor()
    with _open_regular(path, name) as f:
        if objects.version_of(f.read(5), name) == objects.OBJECT_VERSION:
            f.seek(0)
            blob = f.read(_V1_MAX_BYTES + objects.HEADER_SIZE + 1)
            return check_point(
                parse_v1(objects.unpack(objects.POINT_MAGIC, blob, name, dctx, _V1_MAX_BYTES), name),
                chunk_size,
                vm,
                point_id,
                name,
            )
        f.seek(0)
        summary = objects.read_sealed(f, objects.POINT_MAGIC, f"{name} (summary)", MAX_SUMMARY_BYTES, dctx)
        point, ref = parse_summary(summary, name)
        check_point(point, chunk_size, vm, point_id, name)
        if not with_chunks:
            return point
        bound = chunk_lists_bound(point.disks)
        if ref.length > bound:  # refused before anything that big is read or allocated
            raise IntegrityError(f"{name}: chunk lists of {ref.length} bytes, more than its disks can need ({bound})")
        what = f"{name} (chunk lists)"
        raw = objects.read_sealed(f, objects.CHUNK_LIST_MAGIC, what, ref.length, dctx, expect_sha256=ref.sha256)
        if len(raw) != ref.length:
            raise IntegrityError(f"{what}: {len(raw)} bytes, the summary says {ref.length}")
        if f.read(1):
            raise IntegrityError(f"{name}: unexpected bytes after the chunk lists")
    parse_chunk_lists(raw, point, name)
    for disk in point.disks:
        check_chunks(disk, name)
    return point

"""Restore point files, ``points/<vm>/<id>.point``: encoding, and decoding with every check applied.

Format 2 (written now) is two sealed objects (``objects.seal``: length, SHA-256) back to back:
1. the *summary* (``BBRP``): every fact of the point but its chunk lists, plus the length and SHA-256 of (2);
2. the *chunk lists* (``BBCL``): one JSON list of chunk ids per disk.
Listing a repository reads only (1), a few hundred bytes per point whatever the disks' size; (2) is read when a
disk is opened, or by verify and garbage collection. Format 1 (one unsealed ``BBRP`` object holding everything)
is still read, with the same field checks but no checksum. In an encrypted repository each of (1) and (2) is
wrapped in its own ``objects.Envelope`` whose associated data is the point's ``vm/id``: a point file copied under
another name, or a section swapped in from another point, fails authentication.
"""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO

import zstandard

from appliance.errors import IntegrityError
from appliance.repo import objects
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


def encode(point: RestorePoint, envelope: objects.Envelope = objects.Envelope()) -> bytes:  # noqa: B008 - immutable
    """The file for ``point`` (its chunk lists must be loaded), each section wrapped by the repository's
    ``envelope``."""
    cctx = zstandard.ZstdCompressor(level=3)
    chunks = point.chunk_lists_json()
    summary = point.summary_json(len(chunks), hashlib.sha256(chunks).hexdigest())
    ad = _associated(point.vm, point.id)
    return envelope.wrap(
        objects.POINT_MAGIC, objects.seal(objects.POINT_MAGIC, summary, cctx.compress(summary)), ad
    ) + envelope.wrap(
        objects.CHUNK_LIST_MAGIC, objects.seal(objects.CHUNK_LIST_MAGIC, chunks, cctx.compress(chunks)), ad
    )


def _associated(vm: str, point_id: str) -> bytes:
    """What an encrypted point's sections are bound to: the point they belong to."""
    return f"{vm}/{point_id}".encode()


def _read_section(
    f: BinaryIO,
    envelope: objects.Envelope,
    magic: bytes,
    what: str,
    max_raw: int,
    ad: bytes,
    dctx: zstandard.ZstdDecompressor,
    expect_sha256: bytes | None = None,
) -> bytes:
    """The raw payload of the sealed section at ``f``'s position, opened from its envelope when encrypted."""
    if not envelope.encrypted:
        return objects.read_sealed(f, magic, what, max_raw, dctx, expect_sha256)
    inner = io.BytesIO(envelope.read(f, magic, what, ad, objects.SEALED_HEADER_SIZE + objects.stored_bound(max_raw)))
    raw = objects.read_sealed(inner, magic, what, max_raw, dctx, expect_sha256)
    if inner.read(1):
        raise IntegrityError(f"{what}: unexpected bytes after the sealed object")
    return raw


def point_key(vm: str, point_id: str) -> str:
    """Where the point is stored in its repository (``ObjectStore`` key)."""
    return f"points/{vm}/{point_id}.point"


def point_name(vm: str, point_id: str) -> str:
    return f"restore point {point_ref(vm, point_id)}"


def load(
    f: BinaryIO,
    vm: str,
    point_id: str,
    chunk_size: int,
    with_chunks: bool = True,
    envelope: objects.Envelope = objects.Envelope(),  # noqa: B008 - immutable
) -> RestorePoint:
    """The point ``vm@point_id`` read from ``f`` (its stored object, opened by the repository's store), checked
    against its name and the repository's ``chunk_size``; without ``with_chunks`` only its summary is read (a
    format-1 file is always read whole)."""
    name = point_name(vm, point_id)
    ad = _associated(vm, point_id)
    dctx = zstandard.ZstdDecompressor()
    with f:
        if not envelope.encrypted and objects.version_of(f.read(5), name) == objects.OBJECT_VERSION:
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
        summary = _read_section(f, envelope, objects.POINT_MAGIC, f"{name} (summary)", MAX_SUMMARY_BYTES, ad, dctx)
        point, ref = parse_summary(summary, name)
        check_point(point, chunk_size, vm, point_id, name)
        if not with_chunks:
            return point
        bound = chunk_lists_bound(point.disks)
        if ref.length > bound:  # refused before anything that big is read or allocated
            raise IntegrityError(f"{name}: chunk lists of {ref.length} bytes, more than its disks can need ({bound})")
        what = f"{name} (chunk lists)"
        raw = _read_section(f, envelope, objects.CHUNK_LIST_MAGIC, what, ref.length, ad, dctx, ref.sha256)
        if len(raw) != ref.length:
            raise IntegrityError(f"{what}: {len(raw)} bytes, the summary says {ref.length}")
        if f.read(1):
            raise IntegrityError(f"{name}: unexpected bytes after the chunk lists")
    parse_chunk_lists(raw, point, name)
    for disk in point.disks:
        check_chunks(disk, name)
    return point

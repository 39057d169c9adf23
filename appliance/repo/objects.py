"""Framing of every stored object: a 4-byte magic, a format version and a codec byte, then the payload.

Readers check magic and version before anything else, so a file that is not ours, or one written by a newer
bootback, is refused with a message instead of being misread (STYLE.md rule 2).
"""

from __future__ import annotations

import struct

import zstandard

from appliance.errors import IntegrityError, UnsupportedFormatError

CHUNK_MAGIC = b"BBCK"
POINT_MAGIC = b"BBRP"
OBJECT_VERSION = 1

CODEC_ZSTD = 1

# magic, version, codec, reserved, raw length
_HEADER = struct.Struct(">4sBBHI")
HEADER_SIZE = _HEADER.size


def pack(magic: bytes, raw: bytes, compressed: bytes) -> bytes:
    """Frame ``compressed`` (the zstd form of ``raw``) as an object of kind ``magic``."""
    return _HEADER.pack(magic, OBJECT_VERSION, CODEC_ZSTD, 0, len(raw)) + compressed


def unpack(magic: bytes, blob: bytes, name: str, decompressor: zstandard.ZstdDecompressor) -> bytes:
    """Return the payload of an object, checking its frame; ``name`` says what it is in error messages."""
    if len(blob) < HEADER_SIZE:
        raise IntegrityError(f"{name}: truncated object ({len(blob)} bytes, header needs {HEADER_SIZE})")
    got_magic, version, codec, _reserved, raw_len = _HEADER.unpack_from(blob)
    if got_magic != magic:
        raise IntegrityError(f"{name}: bad magic {got_magic!r}, expected {magic!r}")
    if version > OBJECT_VERSION:
        raise UnsupportedFormatError(
            f"{name}: object version {version} is newer than this bootback supports ({OBJECT_VERSION})"
        )
    if codec != CODEC_ZSTD:
        raise IntegrityError(f"{name}: unknown codec {codec}")
    try:
        raw = decompressor.decompress(memoryview(blob)[HEADER_SIZE:], max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: cannot decompress: {exc}") from exc
    if len(raw) != raw_len:
        raise IntegrityError(f"{name}: decompressed to {len(raw)} bytes, header says {raw_len}")
    return raw

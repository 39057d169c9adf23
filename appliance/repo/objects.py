"""Framing of every stored object: a magic, a format version and a codec byte, then the zstd payload.

Readers check magic and version before anything else, so a file that is not ours, or one written by a newer
bootback, is refused with a message instead of being misread (STYLE.md rule 2).

Two header versions exist:
- version 1 (chunks; restore points of format-1 repositories): magic, version, codec, reserved, raw length (u32).
  A chunk needs nothing more: its name is the SHA-256 of its raw bytes, checked on every load.
- version 2, *sealed* (restore points): magic, version, codec, reserved, raw length (u64), stored length (u64),
  SHA-256 of the raw payload. Self-delimiting (several sealed objects can follow each other in one file) and
  checked whole: a damaged byte anywhere is refused, never read as other facts.

In an encrypted repository every object of either version is wrapped whole in an *envelope* (``Envelope``,
version 3): magic, version 3, algorithm (1 = AES-256-GCM), reserved, sealed length (u64), a random 96-bit nonce,
then the AES-256-GCM ciphertext of the inner object and its 16-byte tag. The associated data is the envelope
header plus what the object *is* (a chunk's id, a point's ``vm/id``), so an object moved to another name, a
summary swapped for another point's, or one byte changed anywhere fails authentication before anything is
parsed. An unencrypted object in an encrypted repository (or the reverse) is refused.

Every length is checked against its bound and against the zstd frame's own content size *before* anything is
allocated (zstd allocates the frame's declared size, whatever ``max_output_size`` says).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import IntegrityError, UnsupportedFormatError

CHUNK_MAGIC = b"BBCK"
POINT_MAGIC = b"BBRP"  # a restore point's summary (version 2) or whole manifest (version 1)
CHUNK_LIST_MAGIC = b"BBCL"  # a restore point's chunk lists (version 2, after its summary)
OBJECT_VERSION = 1  # what chunks are written as
SEALED_VERSION = 2
ENCRYPTED_VERSION = 3  # an envelope around a version-1 or version-2 object
NEWEST_VERSION = ENCRYPTED_VERSION

CODEC_ZSTD = 1

# magic, version, codec, reserved, raw length
_HEADER = struct.Struct(">4sBBHI")
HEADER_SIZE = _HEADER.size
# magic, version, codec, reserved, raw length, stored length, sha256(raw)
_SEALED = struct.Struct(">4sBBHQQ32s")
SEALED_HEADER_SIZE = _SEALED.size
# magic, version, algorithm, reserved, sealed length (ciphertext + tag), nonce
_ENVELOPE = struct.Struct(">4sBBHQ12s")
ENVELOPE_HEADER_SIZE = _ENVELOPE.size
ALG_AES_256_GCM = 1
TAG_SIZE = 16
ENVELOPE_OVERHEAD = ENVELOPE_HEADER_SIZE + TAG_SIZE


def pack(magic: bytes, raw: bytes, compressed: bytes) -> bytes:
    """Frame ``compressed`` (the zstd form of ``raw``) as a version-1 object of kind ``magic``."""
    return _HEADER.pack(magic, OBJECT_VERSION, CODEC_ZSTD, 0, len(raw)) + compressed


def seal(magic: bytes, raw: bytes, compressed: bytes) -> bytes:
    """Frame ``compressed`` (the zstd form of ``raw``) as a sealed (version-2) object of kind ``magic``."""
    header = _SEALED.pack(magic, SEALED_VERSION, CODEC_ZSTD, 0, len(raw), len(compressed), hashlib.sha256(raw).digest())
    return header + compressed


def version_of(blob: bytes, name: str) -> int:
    """The object version in a header's first bytes (5 are enough); refuses versions newer than we read."""
    if len(blob) < 5:
        raise IntegrityError(f"{name}: truncated object ({len(blob)} bytes)")
    version = blob[4]
    if version > NEWEST_VERSION:
        raise UnsupportedFormatError(
            f"{name}: object version {version} is newer than this bootback supports ({NEWEST_VERSION})"
        )
    return version


def stored_bound(raw_len: int) -> int:
    """The most bytes zstd can compress ``raw_len`` bytes into (ZSTD_COMPRESSBOUND): anything longer is damage."""
    return raw_len + (raw_len >> 8) + (((128 << 10) - raw_len) >> 11 if raw_len < 128 << 10 else 0)


def max_object_size(max_raw: int) -> int:
    """The largest version-1 object file holding at most ``max_raw`` raw bytes."""
    return HEADER_SIZE + stored_bound(max_raw)


def unpack(
    magic: bytes, blob: bytes | memoryview, name: str, decompressor: zstandard.ZstdDecompressor, max_raw: int
) -> bytes:
    """Return the payload of a version-1 object, checking its frame; its raw payload may be at most ``max_raw``
    bytes (refused before decompressing). ``name`` says what it is in error messages."""
    if len(blob) < HEADER_SIZE:
        raise IntegrityError(f"{name}: truncated object ({len(blob)} bytes, header needs {HEADER_SIZE})")
    got_magic, version, codec, _reserved, raw_len = _HEADER.unpack_from(blob)
    _check_kind(name, magic, got_magic, codec, version)
    if version != OBJECT_VERSION:
        version_of(blob, name)  # newer: UnsupportedFormatError
        raise IntegrityError(f"{name}: object version {version} where version {OBJECT_VERSION} is expected")
    _check_lengths(name, raw_len, len(blob) - HEADER_SIZE, max_raw)
    return _decompress(memoryview(blob)[HEADER_SIZE:], raw_len, name, decompressor)


def read_sealed(
    f: BinaryIO,
    magic: bytes,
    name: str,
    max_raw: int,
    decompressor: zstandard.ZstdDecompressor,
    expect_sha256: bytes | None = None,
) -> bytes:
    """Read one sealed object from ``f``'s position; its raw payload may be at most ``max_raw`` bytes, and its
    checksum must be ``expect_sha256`` when another object names it."""
    header = f.read(SEALED_HEADER_SIZE)
    if len(header) < SEALED_HEADER_SIZE:
        raise IntegrityError(f"{name}: truncated ({len(header)} header bytes, need {SEALED_HEADER_SIZE})")
    got_magic, version, codec, reserved, raw_len, stored_len, digest = _SEALED.unpack(header)
    _check_kind(name, magic, got_magic, codec, version)
    if version != SEALED_VERSION:
        version_of(header, name)
        raise IntegrityError(f"{name}: object version {version} where version {SEALED_VERSION} is expected")
    if reserved:
        raise IntegrityError(f"{name}: reserved header field is {reserved}, expected 0")
    if expect_sha256 is not None and digest != expect_sha256:
        raise IntegrityError(
            f"{name}: checksum {digest.hex()[:16]}... is not the {expect_sha256.hex()[:16]}... expected"
        )
    _check_lengths(name, raw_len, stored_len, max_raw)
    stored = f.read(stored_len)
    if len(stored) != stored_len:
        raise IntegrityError(f"{name}: truncated ({len(stored)} of {stored_len} stored bytes)")
    raw = _decompress(stored, raw_len, name, decompressor)
    if hashlib.sha256(raw).digest() != digest:
        raise IntegrityError(f"{name}: checksum mismatch: the object is damaged")
    return raw


def _check_lengths(name: str, raw_len: int, stored_len: int, max_raw: int) -> None:
    """Refuse a header claiming more than the object may hold, before anything that big is read or allocated."""
    if raw_len > max_raw:
        raise IntegrityError(f"{name}: header says {raw_len} bytes, more than the {max_raw} this object may hold")
    if stored_len > stored_bound(raw_len):
        raise IntegrityError(f"{name}: {stored_len} stored bytes for {raw_len} raw bytes, more than zstd makes")


def _check_kind(name: str, magic: bytes, got_magic: bytes, codec: int, version: int) -> None:
    if got_magic != magic:
        raise IntegrityError(f"{name}: bad magic {got_magic!r}, expected {magic!r}")
    if version == ENCRYPTED_VERSION:
        raise IntegrityError(f"{name}: an encrypted object in an unencrypted repository")
    if codec != CODEC_ZSTD:
        raise IntegrityError(f"{name}: unknown codec {codec}")


def _decompress(data: bytes | memoryview, raw_len: int, name: str, decompressor: zstandard.ZstdDecompressor) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: not a zstd frame: {exc}") from exc
    if declared not in (-1, raw_len):  # checked before zstd allocates what the frame declares
        raise IntegrityError(f"{name}: zstd frame declares {declared} bytes, header says {raw_len}")
    try:
        raw = decompressor.decompress(data, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: cannot decompress: {exc}") from exc
    if len(raw) != raw_len:
        raise IntegrityError(f"{name}: decompressed to {len(raw)} bytes, header says {raw_len}")
    return raw


class Envelope:
    """How one repository wraps its objects: AES-256-GCM with its key, or not at all (``aead`` None). The one
    place objects are encrypted and authenticated; ``ad`` names what the object is (chunk id, point ref)."""

    def __init__(self, aead: AESGCM | None = None) -> None:
        self.aead = aead

    @property
    def encrypted(self) -> bool:
        return self.aead is not None

    @property
    def overhead(self) -> int:
        """Bytes an envelope adds to an object."""
        return ENVELOPE_OVERHEAD if self.aead is not None else 0

    def wrap(self, magic: bytes, inner: bytes, ad: bytes) -> bytes:
        """``inner`` (a whole version-1 or version-2 object of kind ``magic``) as this repository stores it."""
        if self.aead is None:
            return inner
        nonce = os.urandom(12)  # random: 2^32 objects per key keep a nonce collision below 2^-32
        header = _ENVELOPE.pack(magic, ENCRYPTED_VERSION, ALG_AES_256_GCM, 0, len(inner) + TAG_SIZE, nonce)
        return header + self.aead.encrypt(nonce, inner, header + ad)

    def unwrap(
        self, magic: bytes, blob: bytes | memoryview, name: str, ad: bytes, max_inner: int
    ) -> bytes | memoryview:
        """The inner object of a whole stored object ``blob`` (itself when unencrypted)."""
        if self.aead is None:
            return blob
        header, sealed_len = self._header(magic, bytes(blob[:ENVELOPE_HEADER_SIZE]), name, max_inner)
        if len(blob) - ENVELOPE_HEADER_SIZE != sealed_len:
            raise IntegrityError(
                f"{name}: {len(blob) - ENVELOPE_HEADER_SIZE} bytes after the envelope header, it says {sealed_len}"
            )
        return self._open(header, memoryview(blob)[ENVELOPE_HEADER_SIZE:], name, ad)

    def read(self, f: BinaryIO, magic: bytes, name: str, ad: bytes, max_inner: int) -> bytes:
        """The inner object of the envelope at ``f``'s position (several can follow each other in one file)."""
        assert self.aead is not None, "read() is for encrypted repositories"
        header, sealed_len = self._header(magic, f.read(ENVELOPE_HEADER_SIZE), name, max_inner)
        sealed = f.read(sealed_len)
        if len(sealed) != sealed_len:
            raise IntegrityError(f"{name}: truncated ({len(sealed)} of {sealed_len} encrypted bytes)")
        return self._open(header, sealed, name, ad)

    def _header(self, magic: bytes, header: bytes, name: str, max_inner: int) -> tuple[bytes, int]:
        if len(header) < ENVELOPE_HEADER_SIZE:
            raise IntegrityError(
                f"{name}: truncated ({len(header)} envelope header bytes, need {ENVELOPE_HEADER_SIZE})"
            )
        got_magic, version, algorithm, reserved, sealed_len, _nonce = _ENVELOPE.unpack(header)
        if got_magic != magic:
            raise IntegrityError(f"{name}: bad magic {got_magic!r}, expected {magic!r}")
        if version in (OBJECT_VERSION, SEALED_VERSION):
            raise IntegrityError(f"{name}: an unencrypted object (version {version}) in an encrypted repository")
        if version != ENCRYPTED_VERSION:  # a newer bootback marks its repositories (format, features), not only objects
            raise IntegrityError(f"{name}: object version {version} where an encrypted object (version 3) is expected")
        if algorithm != ALG_AES_256_GCM or reserved:
            raise IntegrityError(f"{name}: unknown encryption algorithm {algorithm} (reserved {reserved})")
        if not TAG_SIZE <= sealed_len <= max_inner + TAG_SIZE:
            raise IntegrityError(f"{name}: envelope says {sealed_len} bytes, this object holds at most {max_inner}")
        return header, sealed_len

    def _open(self, header: bytes, sealed: bytes | memoryview, name: str, ad: bytes) -> bytes:
        try:
            return self.aead.decrypt(header[-12:], sealed, header + ad)
        except InvalidTag:
            raise IntegrityError(
                f"{name}: authentication failed: the object is damaged, belongs elsewhere, or the key is wrong"
            ) from None

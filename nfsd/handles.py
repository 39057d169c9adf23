"""Wire file handles: version, export id, fileid, generation and a truncated HMAC, 30 bytes.

ESXi refuses servers whose handles are 64 bytes, so we stay far below the 56-byte limit. Handles carry
nothing that changes across restarts (the secret is persisted), so a handle issued today still resolves
tomorrow; a forged or damaged one fails the MAC check and gets NFS3ERR_BADHANDLE.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path

from nfsd.vfs import NFSError, ObjectId, Status

HANDLE_VERSION = 1
_BODY = struct.Struct(">BBQI")  # version, export id, fileid, generation
MAC_LEN = 16
HANDLE_LEN = _BODY.size + MAC_LEN
assert HANDLE_LEN <= 56
VERIFIED_CACHE = 1 << 16


class HandleCodec:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("handle secret must be at least 16 bytes")
        self._secret = secret
        self._verified: dict[bytes, tuple[int, ObjectId]] = {}

    @classmethod
    def from_file(cls, path: Path) -> HandleCodec:
        """Load the server secret, creating it (0600) on first start."""
        path = Path(path)
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            secret = os.urandom(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
            return cls(secret)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:MAC_LEN]

    def encode(self, export_id: int, obj: ObjectId) -> bytes:
        body = _BODY.pack(HANDLE_VERSION, export_id, obj.fileid, obj.generation)
        return body + self._mac(body)

    def decode(self, handle: bytes | memoryview) -> tuple[int, ObjectId]:
        handle = bytes(handle)
        # Handles that verified once are remembered: every READ/WRITE carries one, and the HMAC costs more
        # than the rest of decoding. Only verified handles enter, so forged ones are always checked.
        hit = self._verified.get(handle)
        if hit is not None:
            return hit
        result = self._decode(handle)
        if len(self._verified) >= VERIFIED_CACHE:
            self._verified.clear()
        self._verified[handle] = result
        return result

    def _decode(self, handle: bytes) -> tuple[int, ObjectId]:
        if len(handle) != HANDLE_LEN:
            raise NFSError(Status.BADHANDLE, f"handle of {len(handle)} bytes, expected {HANDLE_LEN}")
        body, mac = handle[: _BODY.size], handle[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise NFSError(Status.BADHANDLE, "handle MAC does not verify")
        version, export_id, fileid, generation = _BODY.unpack(body)
        if version != HANDLE_VERSION:
            raise NFSError(Status.BADHANDLE, f"handle version {version}")
        return export_id, ObjectId(fileid, generation)

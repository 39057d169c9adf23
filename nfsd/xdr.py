"""XDR (RFC 4506) encoding: a Packer that appends to a bytearray and an Unpacker over a memoryview.

Unpacking never trusts a length from the wire: every opaque, string and array length is checked against the
bytes left and a caller-given maximum before anything is allocated, and errors say what was expected.
"""

from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_U32x2 = struct.Struct(">II")


class XDRError(ValueError):
    """The bytes do not decode as the XDR type expected."""


class Packer:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u32(self, v: int) -> Packer:
        self.buf += _U32.pack(v & 0xFFFFFFFF)
        return self

    def i32(self, v: int) -> Packer:
        self.buf += _I32.pack(v)
        return self

    def u64(self, v: int) -> Packer:
        self.buf += _U64.pack(v & 0xFFFFFFFFFFFFFFFF)
        return self

    def bool(self, v: bool) -> Packer:
        return self.u32(1 if v else 0)

    def fixed(self, data: bytes) -> Packer:
        self.buf += data
        pad = -len(data) % 4
        if pad:
            self.buf += b"\0" * pad
        return self

    def opaque(self, data: bytes | bytearray | memoryview) -> Packer:
        self.u32(len(data))
        return self.fixed(data)

    def string(self, s: str) -> Packer:
        return self.opaque(s.encode("utf-8", "surrogateescape"))

    def bytes(self) -> bytes:
        return bytes(self.buf)


class Unpacker:
    __slots__ = ("view", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.view = memoryview(data)
        self.pos = pos

    def _need(self, n: int, what: str) -> int:
        p = self.pos
        if p + n > len(self.view):
            raise XDRError(f"{what}: need {n} bytes at offset {p}, only {len(self.view) - p} left")
        self.pos = p + n
        return p

    def u32(self, what: str = "uint32") -> int:
        return _U32.unpack_from(self.view, self._need(4, what))[0]

    def i32(self, what: str = "int32") -> int:
        return _I32.unpack_from(self.view, self._need(4, what))[0]

    def u64(self, what: str = "uint64") -> int:
        return _U64.unpack_from(self.view, self._need(8, what))[0]

    def u32x2(self, what: str = "2 x uint32") -> tuple[int, int]:
        return _U32x2.unpack_from(self.view, self._need(8, what))

    def bool(self, what: str = "bool") -> bool:
        v = self.u32(what)
        if v > 1:
            raise XDRError(f"{what}: bool must be 0 or 1, got {v}")
        return v == 1

    def fixed(self, n: int, what: str = "fixed opaque") -> memoryview:
        p = self._need(n + (-n % 4), what)
        return self.view[p : p + n]

    def opaque(self, maximum: int, what: str = "opaque") -> memoryview:
        n = self.u32(what)
        if n > maximum:
            raise XDRError(f"{what}: length {n} exceeds the maximum {maximum}")
        return self.fixed(n, what)

    def string(self, maximum: int, what: str = "string") -> str:
        raw = bytes(self.opaque(maximum, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Names are bytes on the wire; keep undecodable ones round-trippable instead of refusing them.
            return raw.decode("utf-8", "surrogateescape")

    def remaining(self) -> int:
        return len(self.view) - self.pos

    def done(self, what: str = "arguments") -> None:
        if self.pos != len(self.view):
            raise XDRError(f"{what}: {len(self.view) - self.pos} unexpected trailing bytes")

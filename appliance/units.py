"""Byte units and size parsing: a leaf module (it imports only appliance.errors) that any layer may use."""

from __future__ import annotations

from appliance.errors import UsageError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIXES = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_size(text: str) -> int:
    """'1M', '64K', '4MiB', '1048576' -> bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = _SUFFIXES.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SUFFIXES else t
    if not digits.isdigit():
        raise UsageError(f"invalid size {text!r}: expected e.g. 64K, 1M, 4M")
    return int(digits) * mult

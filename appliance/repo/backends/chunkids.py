"""The chunk ids a backup deduplicates against, kept out of memory.

A backup to S3 lists ``chunks/`` once and then asks, for every chunk it makes, whether the repository holds it.
A set of the listed key strings took ~120 MB per million chunks (a 4 TB repository of 1 MiB chunks: ~500 MB).
Here the ids go, as 32-byte records, into an unlinked temporary file (``$TMPDIR``) in the listing's order, which
is key order and so id order (a key is ``chunks/<first two hex digits>/<64 hex digits>``); a lookup is a bisection
over the file mapped in memory: ~20 page reads per lookup, the hot ones in the page cache, the process's memory
constant. 32 MB of disk per million chunks, gone when the backup ends (or dies).
"""

from __future__ import annotations

import mmap
import re
import tempfile
from collections.abc import Iterable

from appliance.errors import IntegrityError

RECORD = 32  # a SHA-256 or HMAC-SHA256 chunk id
_KEY_RE = re.compile(r"chunks/([0-9a-f]{2})/(\1[0-9a-f]{62})")
_WRITE_BATCH = 32768  # records buffered before a write: 1 MiB


def _record(key: str) -> bytes | None:
    m = _KEY_RE.fullmatch(key)
    return bytes.fromhex(m.group(2)) if m else None


class ChunkIds:
    """The chunk keys of one listing, searchable by bisection; ``close`` removes them."""

    def __init__(self, keys: Iterable[str], what: str) -> None:
        self._file = tempfile.TemporaryFile(prefix="bootback-chunk-ids-")  # noqa: SIM115 - kept until close()
        self._map: mmap.mmap | None = None
        self.count = 0
        last, buf = b"", bytearray()
        try:
            for key in keys:
                rec = _record(key)
                if rec is None:
                    continue  # not a chunk object (a stray upload): never asked for
                if rec <= last:
                    raise IntegrityError(f"{what}: the listing of chunks/ is not in key order at {key}")
                last = rec
                buf += rec
                self.count += 1
                if len(buf) >= _WRITE_BATCH * RECORD:
                    self._file.write(buf)
                    buf.clear()
            self._file.write(buf)
            self._file.flush()
            if self.count:
                self._map = mmap.mmap(self._file.fileno(), self.count * RECORD, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def __contains__(self, key: str) -> bool:
        rec = _record(key)
        if rec is None or self._map is None:
            return False
        lo, hi, m = 0, self.count, self._map
        while lo < hi:
            mid = (lo + hi) // 2
            probe = m[mid * RECORD : mid * RECORD + RECORD]
            if probe == rec:
                return True
            if probe < rec:
                lo = mid + 1
            else:
                hi = mid
        return False

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

"""A restore point's disk as the seekable file object dissect's parsers read from."""

from __future__ import annotations

from dissect.util.stream import AlignedStream

from appliance.repo.reader import DiskReader

ALIGN = 64 << 10  # filesystem metadata reads are small: buffer 64 KiB, the chunk cache holds the rest


class DiskStream(AlignedStream):
    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        super().__init__(size=reader.size, align=ALIGN)

    def _read(self, offset: int, length: int) -> bytes:
        return self.reader.read(offset, length)

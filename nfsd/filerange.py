"""Reply data that is still in a file: a READ's bytes sent straight from the page cache with sendfile(2).

A large READ answered from an immutable file (the read cache of a published disk) would otherwise be copied
twice on the event loop's thread, into a fresh buffer by ``pread`` and into the socket by ``send``, with the
buffer's pages faulted in and zeroed first. ``sendfile`` does neither: the kernel hands the page-cache pages to
TCP. Measured on 8 sequential readers: those copies and faults were ~45 % of the server's CPU (docs/benchmarks.md).

A backend's ``read_nowait`` may return a ``FileRange`` instead of bytes (``nfsd.vfs``); only for files whose
bytes in the range never change while the descriptor is open, because they leave later, when the connection
flushes. The TCP connection sends it with ``sendfile`` when nothing is queued before it, else reads it
(``read``); UDP always reads it.
"""

from __future__ import annotations

import os

# Below this a copy is cheaper than the extra system calls (the reply head goes out on its own first).
MIN_RANGE = 128 * 1024


class SharedFd:
    """A descriptor closed when its last holder lets go: its owner and every ``FileRange`` not yet sent.

    The owner (a read cache closing when its session ends) only drops its reference, so a reply still queued
    can never be sent from a descriptor number the process has reused for another file meanwhile."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class FileRange:
    """``length`` bytes at ``offset`` of an open file that will not change while this exists."""

    __slots__ = ("file", "offset", "length")

    def __init__(self, file: SharedFd, offset: int, length: int) -> None:
        self.file = file
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        """The bytes themselves (for a transport that cannot send from a file). Never short: a file that
        shrank under us is a broken promise, and a short reply would desynchronise the record stream."""
        data = os.pread(self.file.fd, self.length, self.offset)
        if len(data) != self.length:
            raise OSError(f"file range of {self.length} bytes at {self.offset} read {len(data)}")
        return data

    def send(self, sock_fd: int) -> int:
        """Send as much as the socket takes without blocking: the bytes sent (0 if it takes none now)."""
        sent = 0
        while sent < self.length:
            try:
                n = os.sendfile(sock_fd, self.file.fd, self.offset + sent, self.length - sent)
            except BlockingIOError:
                break
            if n == 0:  # end of file: the caller sends the rest with read(), which reports it
                break
            sent += n
        return sent

    def tail(self, sent: int) -> FileRange:
        return FileRange(self.file, self.offset + sent, self.length - sent)

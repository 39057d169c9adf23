"""READ data sent from the read cache's file with sendfile(2) (``nfsd.filerange``): the bytes, their order in
the record stream whether or not the socket has room, the descriptor's lifetime, and a file that broke its
promise (shrank) closing the connection instead of sending wrong or short data."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.repo.readcache import ReadCache
from nfsd import eventloop
from nfsd.filerange import MIN_RANGE, FileRange, SharedFd
from nfsd.rpc import TcpConnection
from tests.backed_up import backed_up

MiB = 1 << 20
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": eventloop.loop_factory() or asyncio.new_event_loop}


def test_a_hydrated_read_comes_as_a_file_range_that_outlives_its_cache(tmp_path: Path) -> None:
    rnd = random.Random(5)
    data = rnd.randbytes(3 * MiB)
    repo = backed_up(tmp_path, data)
    cache = ReadCache(tmp_path / "rc", 1 << 30)
    rp = repo.restore_point("vm", "latest")
    reader = repo.open_disk(rp, rp.disks[0].name, read_cache=cache)

    assert reader.file_range(0, MIN_RANGE) is None  # not hydrated yet
    reader.hydrate(0)
    reader.hydrate(1)
    assert reader.file_range(10, MIN_RANGE - 1) is None  # small reads are copied
    assert reader.file_range(MiB - 4096, MIN_RANGE) is not None
    assert reader.file_range(2 * MiB - 4096, MIN_RANGE) is None  # reaches chunk 2, not hydrated
    got = reader.file_range(MiB - 4096, 300_000)
    assert isinstance(got, FileRange) and len(got) == 300_000
    assert got.read() == data[MiB - 4096 : MiB - 4096 + 300_000]

    fd = got.file.fd
    inode = os.fstat(fd).st_ino
    cache.close()  # the session ends while the reply is still queued: its descriptor must stay open
    assert not (tmp_path / "rc").exists()
    assert got.read() == data[MiB - 4096 : MiB - 4096 + 300_000]
    del got, reader
    gc.collect()
    try:  # closed with its last holder (the number may already name another file of another thread)
        assert os.fstat(fd).st_ino != inode
    except OSError:
        pass


class Replies:
    """A dispatcher answering each record with the parts the test queued for it, in order."""

    def __init__(self, replies: list[list]) -> None:
        self.replies = replies

    async def handle(self, record: bytes, address: tuple, transport: str, flow: object = None) -> list:
        return self.replies.pop(0)


def serve(loop_name: str, replies: list[list], client: Callable[[socket.socket], object]) -> object:
    """Run a real TcpConnection on one end of a socket pair; ``client`` runs in a thread on the other end."""
    loop = LOOPS[loop_name]()
    ours, theirs = socket.socketpair()
    theirs.settimeout(20)
    try:

        async def scenario() -> object:
            await loop.connect_accepted_socket(lambda: TcpConnection(Replies(replies)), ours)
            return await loop.run_in_executor(None, client, theirs)

        return loop.run_until_complete(scenario())
    finally:
        theirs.close()
        loop.close()


def call(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", 0x80000000 | len(payload)) + payload)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


def record(sock: socket.socket) -> bytes:
    (mark,) = struct.unpack(">I", recv_exact(sock, 4))
    assert mark & 0x80000000
    return recv_exact(sock, mark & 0x7FFFFFFF)


@pytest.fixture
def content(tmp_path: Path) -> tuple[SharedFd, bytes]:
    data = random.Random(9).randbytes(2 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    return SharedFd(os.open(path, os.O_RDONLY)), data


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_file_ranges_go_out_whole_and_in_order_with_or_without_room(
    loop_name: str, content: tuple[SharedFd, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, data = content
    sent_from_file: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        n = real_sendfile(out_fd, in_fd, offset, count)
        sent_from_file.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    big = random.Random(1).randbytes(8 * MiB)
    replies = [
        [b"head-one", FileRange(shared, 100, 700_000)],  # an idle socket: straight from the file
        [big],  # a client that is not reading: this fills the socket and the transport buffers the rest
        [b"head-two", FileRange(shared, MiB + 3, 500_001), b"\0\0\0"],  # queued behind it: copied in order
    ]

    def client(sock: socket.socket) -> list[bytes]:
        call(sock, b"1")
        first = record(sock)
        call(sock, b"2")
        call(sock, b"3")
        return [first, record(sock), record(sock)]

    first, second, third = serve(loop_name, replies, client)
    assert first == b"head-one" + data[100:700_100]
    assert second == big
    assert third == b"head-two" + data[MiB + 3 : MiB + 500_004] + b"\0\0\0"
    # the first went by sendfile(2), as far as the socket took it (the rest copied after it, in order)
    assert sent_from_file and sent_from_file[0] > 0


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_file_that_shrank_closes_the_connection_instead_of_sending_short(
    loop_name: str, tmp_path: Path, content: tuple[SharedFd, bytes]
) -> None:
    path = tmp_path / "shrinks"
    path.write_bytes(bytes(MiB))
    shared = SharedFd(os.open(path, os.O_RDONLY))
    os.truncate(path, MiB // 2)
    replies = [[b"head", FileRange(shared, 0, MiB)]]

    def client(sock: socket.socket) -> bytes:
        call(sock, b"1")
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
        return bytes(got)

    got = serve(loop_name, replies, client)
    # whatever left before the file ran out, the record never completes: the client sees a closed stream
    assert len(got) < 4 + len(b"head") + MiB

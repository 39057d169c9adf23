"""A slow backend call must never hold up others: ESXi's heartbeat is a GETATTR, and when it goes
unanswered for seconds the host declares the datastore lost. Calls on one connection are answered as they
finish, not in order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.server import NFSServer
from nfsd.xdr import Packer, Unpacker
from tests.rpcclient import RpcClient, auth_sys, call_bytes, record

SLOW_OFFSET = 4096


class SlowDisk(LocalFS):
    """Reads at SLOW_OFFSET take two seconds, like a backup chunk on a busy repository disk."""

    def read(self, obj, offset, count):  # noqa: ANN001, ANN201 - the Backend signature
        if offset == SLOW_OFFSET:
            time.sleep(2)
        return super().read(obj, offset, count)

    def read_nowait(self, obj, offset, count):  # noqa: ANN001, ANN201
        return None  # always take the worker-thread path, where slowness lives


@contextlib.contextmanager
def running(server: NFSServer):  # noqa: ANN201
    """The server on its own event loop in a thread, like the daemon runs it; yields its ports."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    ports = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        ports["p"] = loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield ports["p"]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def slow_server(tmp_path: Path) -> NFSServer:
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "disk").write_bytes(bytes(range(256)) * 64)
    return NFSServer(
        [Export(path="/slow", backend=SlowDisk(export_dir))],
        codec=HandleCodec(b"k" * 32),
        bind="127.0.0.1",
        nfs_port=0,
        mount_port=0,
        portmap_port=None,
    )


def lookup(c: RpcClient, root: bytes, name: str) -> bytes:
    u = c.call(100003, 3, 3, Packer().opaque(root).string(name).bytes())
    assert u.u32() == 0
    return bytes(u.opaque(64))


def test_getattr_is_answered_while_reads_block(tmp_path: Path) -> None:
    with running(slow_server(tmp_path)) as p:
        root = RpcClient("127.0.0.1", p.mount).mount("/slow")
        c = RpcClient("127.0.0.1", p.nfs)
        fh = lookup(c, root, "disk")
        # Eight slow READs in flight on this connection, then the heartbeat.
        for xid in range(100, 108):
            c.send_raw(
                record(call_bytes(xid, 100003, 3, 6, Packer().opaque(fh).u64(SLOW_OFFSET).u32(512).bytes(), auth_sys()))
            )
        sent = time.monotonic()
        c.send_raw(record(call_bytes(999, 100003, 3, 1, Packer().opaque(fh).bytes(), auth_sys())))
        first = Unpacker(c.recv_record())
        assert first.u32() == 999, "the GETATTR waited behind the slow READs"
        assert time.monotonic() - sent < 1.0
        xids = {Unpacker(c.recv_record()).u32() for _ in range(8)}
        assert xids == set(range(100, 108))
        assert time.monotonic() - sent < 4.0, "slow READs were served one after another, not concurrently"


def test_eight_connections_from_one_client_interleave(tmp_path: Path) -> None:
    """ESXi 8 opens up to eight TCP connections per datastore; each gets its own replies, byte-exact."""
    content = bytes(range(256)) * 64
    with running(slow_server(tmp_path)) as p:
        root = RpcClient("127.0.0.1", p.mount).mount("/slow")
        conns = [RpcClient("127.0.0.1", p.nfs) for _ in range(8)]
        fh = lookup(conns[0], root, "disk")
        for k, c in enumerate(conns):  # several calls in flight on every connection at once
            for j in range(4):
                off = (k * 4 + j) * 512
                c.send_raw(
                    record(
                        call_bytes(k * 100 + j, 100003, 3, 6, Packer().opaque(fh).u64(off).u32(512).bytes(), auth_sys())
                    )
                )
        for k, c in enumerate(conns):
            got = {}
            for _ in range(4):
                u = Unpacker(c.recv_record())
                xid = u.u32()
                u.u32(), u.u32(), u.u32(), u.opaque(400), u.u32()  # reply header: accepted, verifier, SUCCESS
                assert u.u32() == 0
                if u.bool():
                    u.fixed(84)
                u.u32(), u.bool()
                got[xid] = bytes(u.opaque(4096))
            for j in range(4):
                off = (k * 4 + j) * 512
                assert got[k * 100 + j] == content[off : off + 512]

"""Calls the NFS server answers on its event loop, without a worker thread: a hypervisor's heartbeat GETATTR
of a running disk, and READs from memory. They must be answered even while every metadata worker is stuck
(a slow disk under the datastore's real files), and answered the same as through a worker."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from pathlib import Path

from appliance.cache.overlay import WriteCache
from appliance.datastore.backend import DatastoreBackend
from appliance.datastore.folder import SessionFolder
from nfsd.exports import Export, ExportTable
from nfsd.handles import HandleCodec
from nfsd.nfs3 import NFSv3
from nfsd.rpc import Dispatcher
from nfsd.vfs import ObjectId
from nfsd.xdr import Packer
from tests.rpcclient import auth_sys, call_bytes

MiB = 1 << 20
BASE = bytes(range(256)) * (MiB // 256)
GETATTR, ACCESS, READ = 1, 4, 6


def setup(tmp_path: Path) -> tuple[Dispatcher, NFSv3, bytes, bytes]:
    """A datastore with one published folder: (dispatcher, nfs, extent handle, real file handle)."""
    ds = DatastoreBackend(tmp_path / "root")
    (tmp_path / "s" / "files").mkdir(parents=True)
    (tmp_path / "s" / "files" / "vm.vmx").write_text("x")
    cache = WriteCache(tmp_path / "s" / "disks", "d0", lambda o, n: BASE[o : o + n].ljust(n, b"\0"), MiB)
    ds.add_folder(1, "vm", SessionFolder(tmp_path / "s", {"vm-flat.vmdk": cache}))
    table = ExportTable(HandleCodec(b"k" * 32))
    export = Export("/datastore", ds)
    table.add(export)
    nfs = NFSv3(table, meta_workers=1)
    dispatcher = Dispatcher()
    dispatcher.register(nfs)
    folder = ds.lookup(ds.root(), "vm")
    ext: ObjectId = ds.lookup(folder, "vm-flat.vmdk")
    vmx: ObjectId = ds.lookup(folder, "vm.vmx")
    return dispatcher, nfs, table.handle(export, ext), table.handle(export, vmx)


def record(proc: int, args: bytes, xid: int) -> bytes:
    return call_bytes(xid, 100003, 3, proc, args, auth_sys(os.getuid(), os.getgid()))


def status(parts: list) -> int:
    reply = b"".join(bytes(p) for p in parts)
    assert reply[20:24] == b"\0\0\0\0", reply[:24].hex()  # accepted, SUCCESS
    return struct.unpack(">I", reply[24:28])[0]


def test_extent_attributes_are_answered_while_every_metadata_worker_is_stuck(tmp_path: Path) -> None:
    dispatcher, nfs, ext_fh, vmx_fh = setup(tmp_path)
    stuck = threading.Event()
    nfs.meta_pool.submit(stuck.wait, 30)  # the only metadata worker, busy until released

    async def scenario() -> None:
        fh = Packer().opaque(ext_fh).bytes()
        for xid, (proc, args) in enumerate([(GETATTR, fh), (ACCESS, fh + struct.pack(">I", 0x3F))], 1):
            parts = await asyncio.wait_for(dispatcher.handle(record(proc, args, xid), ("127.0.0.1", 700), "tcp"), 5)
            assert status(parts) == 0
        # a real file's attributes need the walk a worker does: that one waits for the worker
        real = asyncio.ensure_future(
            dispatcher.handle(record(GETATTR, Packer().opaque(vmx_fh).bytes(), 9), ("127.0.0.1", 700), "tcp")
        )
        await asyncio.sleep(0.3)
        assert not real.done()
        stuck.set()
        assert status(await asyncio.wait_for(real, 5)) == 0

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        stuck.set()
        nfs.close()
        loop.close()

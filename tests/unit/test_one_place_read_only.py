"""Issue 9: read-only is enforced in one place, the protocol layer: every modifying NFSv3 procedure on a
read-only export, or on a backend that is read-only by nature, is refused with NFS3ERR_ROFS before the
backend is called (the backend here would happily write: it has no checks of its own)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfsd.exports import Export, ExportTable
from nfsd.handles import HandleCodec
from nfsd.localfs import LocalFS
from nfsd.mount import MountV3
from nfsd.nfs3 import NFSv3
from nfsd.rpc import Dispatcher
from nfsd.xdr import Packer
from tests.rpcclient import auth_sys, call_bytes

NFS3ERR_ROFS = 30  # RFC 1813
NO_SATTR = struct.pack(">IIIIII", 0, 0, 0, 0, 0, 0)  # sattr3 with nothing set


class Recording(LocalFS):
    """A LocalFS that records which of its modifying methods were reached."""

    reached: list[str]

    def __getattribute__(self, name: str):  # noqa: ANN204
        if name in ("setattr", "write", "commit", "create", "mkdir", "symlink", "remove", "rmdir", "rename", "link"):
            object.__getattribute__(self, "reached").append(name)
        return object.__getattribute__(self, name)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple]:
    for d in ("ro-export", "ro-backend"):
        (tmp_path / d / "sub").mkdir(parents=True)
        (tmp_path / d / "file").write_bytes(b"original")
    table = ExportTable(HandleCodec(b"r" * 32))
    backends = {
        "/ro-export": Recording(tmp_path / "ro-export"),
        "/ro-backend": Recording(tmp_path / "ro-backend", read_only=True),
    }
    for b in backends.values():
        b.reached = []
    table.add(Export("/ro-export", backends["/ro-export"], read_only=True))
    table.add(Export("/ro-backend", backends["/ro-backend"]))
    dispatcher, nfs = Dispatcher(), NFSv3(table)
    dispatcher.register(nfs)
    dispatcher.register(MountV3(table))
    loop = asyncio.new_event_loop()
    try:
        yield tmp_path, loop, dispatcher, backends
    finally:
        nfs.close()
        loop.close()


def _call(loop, dispatcher, prog: int, proc: int, args: bytes) -> bytes:  # noqa: ANN001
    record = call_bytes(7, prog, 3, proc, args, auth_sys(os.getuid(), os.getgid()))
    reply = b"".join(bytes(p) for p in loop.run_until_complete(dispatcher.handle(record, ("127.0.0.1", 700), "tcp")))
    return reply[24:]  # after the accepted-reply header


def _fh(body: bytes, at: int) -> bytes:
    (n,) = struct.unpack(">I", body[at : at + 4])
    return body[at + 4 : at + 4 + n]


@pytest.mark.parametrize("path", ["/ro-export", "/ro-backend"])
def test_every_modifying_procedure_is_rofs_before_the_backend(world: tuple, path: str) -> None:
    tmp, loop, dispatcher, backends = world
    root = _fh(_call(loop, dispatcher, 100005, 1, Packer().string(path).bytes()), 4)
    file = _fh(_call(loop, dispatcher, 100003, 3, Packer().opaque(root).string("file").bytes()), 4)
    d = Packer().opaque(root)
    calls = {
        2: Packer().opaque(file).bytes() + NO_SATTR + struct.pack(">I", 0),  # SETATTR
        7: Packer().opaque(file).u64(0).u32(4).u32(2).opaque(b"evil").bytes(),  # WRITE FILE_SYNC
        8: d.bytes() + Packer().string("new").u32(0).bytes() + NO_SATTR,  # CREATE UNCHECKED
        9: d.bytes() + Packer().string("newdir").bytes() + NO_SATTR,  # MKDIR
        10: d.bytes() + Packer().string("ln").bytes() + NO_SATTR + Packer().string("file").bytes(),  # SYMLINK
        12: d.bytes() + Packer().string("file").bytes(),  # REMOVE
        13: d.bytes() + Packer().string("sub").bytes(),  # RMDIR
        14: d.bytes() + Packer().string("file").opaque(root).string("moved").bytes(),  # RENAME
        15: Packer().opaque(file).opaque(root).string("hard").bytes(),  # LINK
        21: Packer().opaque(file).u64(0).u32(0).bytes(),  # COMMIT
    }
    for proc, args in calls.items():
        body = _call(loop, dispatcher, 100003, proc, args)
        assert struct.unpack(">I", body[:4])[0] == NFS3ERR_ROFS, (path, proc, body[:8].hex())
    assert backends[path].reached == []  # refused before the backend
    here = tmp / path.lstrip("/")
    assert sorted(p.name for p in here.iterdir()) == ["file", "sub"] and (here / "file").read_bytes() == b"original"

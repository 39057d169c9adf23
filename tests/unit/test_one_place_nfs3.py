"""Issue 9, nfsd/nfs3.py: failure replies carry exactly RFC 1813's resfail arm for every procedure (golden bytes
written out here from the RFC, not taken from the code), and FSINFO/PATHCONF ask the backend from a worker
thread, never on the event loop."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
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

ABSENT_ATTR = bytes(4)  # post_op_attr: attributes_follow = FALSE
ABSENT_WCC = bytes(8)  # wcc_data: pre_op_attr FALSE, post_op_attr FALSE
# RFC 1813 section 3.3.x, the resfail arm of each procedure after its nfsstat3.
RESFAIL = {
    1: b"",  # GETATTR3resfail: void
    2: ABSENT_WCC,  # SETATTR3resfail: obj_wcc
    3: ABSENT_ATTR,  # LOOKUP3resfail: dir_attributes
    4: ABSENT_ATTR,  # ACCESS3resfail: obj_attributes
    5: ABSENT_ATTR,  # READLINK3resfail: symlink_attributes
    6: ABSENT_ATTR,  # READ3resfail: file_attributes
    7: ABSENT_WCC,  # WRITE3resfail: file_wcc
    8: ABSENT_WCC,  # CREATE3resfail: dir_wcc
    9: ABSENT_WCC,  # MKDIR3resfail: dir_wcc
    10: ABSENT_WCC,  # SYMLINK3resfail: dir_wcc
    11: ABSENT_WCC,  # MKNOD3resfail: dir_wcc
    12: ABSENT_WCC,  # REMOVE3resfail: dir_wcc
    13: ABSENT_WCC,  # RMDIR3resfail: dir_wcc
    14: ABSENT_WCC + ABSENT_WCC,  # RENAME3resfail: fromdir_wcc, todir_wcc
    15: ABSENT_ATTR + ABSENT_WCC,  # LINK3resfail: file_attributes, linkdir_wcc
    16: ABSENT_ATTR,  # READDIR3resfail: dir_attributes
    17: ABSENT_ATTR,  # READDIRPLUS3resfail: dir_attributes
    18: ABSENT_ATTR,  # FSSTAT3resfail: obj_attributes
    19: ABSENT_ATTR,  # FSINFO3resfail: obj_attributes
    20: ABSENT_ATTR,  # PATHCONF3resfail: obj_attributes
    21: ABSENT_WCC,  # COMMIT3resfail: file_wcc
}
NFS3ERR_BADHANDLE, NFS3ERR_STALE = 10001, 70


class ThreadNoting(LocalFS):
    """A LocalFS that notes the thread FSINFO and PATHCONF run on."""

    seen: dict[str, str]

    def fsinfo(self, obj):  # noqa: ANN001, ANN201
        self.seen["fsinfo"] = threading.current_thread().name
        return super().fsinfo(obj)

    def pathconf(self, obj):  # noqa: ANN001, ANN201
        self.seen["pathconf"] = threading.current_thread().name
        return super().pathconf(obj)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple]:
    backend = ThreadNoting(tmp_path)
    backend.seen = {}
    table = ExportTable(HandleCodec(b"t" * 32))
    table.add(Export("/export", backend))
    dispatcher, nfs = Dispatcher(), NFSv3(table)
    dispatcher.register(nfs)
    dispatcher.register(MountV3(table))
    loop = asyncio.new_event_loop()
    try:
        yield loop, dispatcher, backend
    finally:
        nfs.close()
        loop.close()


def _call(loop, dispatcher, prog: int, proc: int, args: bytes) -> bytes:  # noqa: ANN001
    record = call_bytes(9, prog, 3, proc, args, auth_sys(os.getuid(), os.getgid()))
    reply = b"".join(bytes(p) for p in loop.run_until_complete(dispatcher.handle(record, ("127.0.0.1", 700), "tcp")))
    assert reply[:24] == struct.pack(">IIIIII", 9, 1, 0, 0, 0, 0), reply[:24].hex()  # accepted, SUCCESS
    return reply[24:]


@pytest.mark.parametrize("proc", sorted(RESFAIL))
def test_a_failed_call_is_the_status_then_exactly_the_rfc_resfail_arm(world: tuple, proc: int) -> None:
    loop, dispatcher, _ = world
    forged = Packer().opaque(b"\x01" * 32).bytes()  # no valid handle: refused before any backend call
    body = _call(loop, dispatcher, 100003, proc, forged)
    assert struct.unpack(">I", body[:4])[0] in (NFS3ERR_BADHANDLE, NFS3ERR_STALE), body.hex()
    assert body[4:] == RESFAIL[proc]


def test_fsinfo_and_pathconf_ask_the_backend_off_the_event_loop(world: tuple) -> None:
    loop, dispatcher, backend = world
    mnt = _call(loop, dispatcher, 100005, 1, Packer().string("/export").bytes())
    root = mnt[8 : 8 + struct.unpack(">I", mnt[4:8])[0]]
    for proc in (19, 20):
        assert _call(loop, dispatcher, 100003, proc, Packer().opaque(root).bytes())[:4] == bytes(4)
    loop_thread = threading.current_thread().name  # run_until_complete runs the loop on this thread
    assert backend.seen.keys() == {"fsinfo", "pathconf"}
    assert all(name != loop_thread and name.startswith("nfs-meta") for name in backend.seen.values()), backend.seen

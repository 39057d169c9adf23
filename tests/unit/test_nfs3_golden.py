"""Golden bytes of NFSv3 replies, built here with struct.pack from RFC 1813, never with the code under test.

A real ``Dispatcher`` serves a ``LocalFS`` export (and a read-only one); calls go in as RPC records and the whole
reply comes out as bytes. fattr3 (RFC 1813 2.6) is checked field by field against ``os.lstat`` of the file, and
failure replies against the RFC's resfail shapes: the status, then post_op_attr / wcc_data. Where the server
knows the object, the attributes may be present (then they must be exactly the object's) or absent; where the
handle is forged, they must be absent.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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

# RFC 1813 numbers, written out here on purpose (not imported from nfsd.vfs).
NF3REG, NF3DIR, NF3LNK = 1, 2, 5
NFS3_OK, NFS3ERR_NOENT, NFS3ERR_EXIST, NFS3ERR_ROFS, NFS3ERR_BADHANDLE = 0, 2, 17, 30, 10001
GETATTR, SETATTR, LOOKUP, ACCESS, READLINK, READ, WRITE, CREATE, MKDIR = 1, 2, 3, 4, 5, 6, 7, 8, 9
REMOVE, RMDIR, RENAME, READDIR, FSSTAT, FSINFO, PATHCONF, COMMIT = 12, 13, 14, 16, 18, 19, 20, 21
FALSE, TRUE = struct.pack(">I", 0), struct.pack(">I", 1)


def fattr3(path: Path) -> bytes:
    """RFC 1813 2.6: type, mode, nlink, uid, gid, size3 size, size3 used, specdata3 rdev, uint64 fsid,
    fileid3 fileid, nfstime3 atime, mtime, ctime (seconds, nseconds)."""
    st = os.lstat(path)
    kind = {0o100000: NF3REG, 0o040000: NF3DIR, 0o120000: NF3LNK}[st.st_mode & 0o170000]

    def nfstime(ns: int) -> bytes:
        return struct.pack(">II", ns // 10**9, ns % 10**9)

    return (
        struct.pack(">IIIII", kind, st.st_mode & 0o7777, st.st_nlink, st.st_uid, st.st_gid)
        + struct.pack(">QQ", st.st_size, st.st_blocks * 512)
        + struct.pack(">II", os.major(st.st_rdev), os.minor(st.st_rdev))
        + struct.pack(">QQ", st.st_dev, st.st_ino)
        + nfstime(st.st_atime_ns)
        + nfstime(st.st_mtime_ns)
        + nfstime(st.st_ctime_ns)
    )


def post_op_attr(path: Path) -> set[bytes]:
    """Either form RFC 1813 allows: absent, or present and exactly the object's attributes."""
    return {FALSE, TRUE + fattr3(path)}


def wcc_data(path: Path) -> set[bytes]:
    """pre_op_attr (size, mtime, ctime) then post_op_attr; a failed call changed nothing, so both are now's."""
    st = os.lstat(path)
    wcc_attr = struct.pack(">QIIII", st.st_size, *divmod(st.st_mtime_ns, 10**9), *divmod(st.st_ctime_ns, 10**9))
    return {pre + post for pre in (FALSE, TRUE + wcc_attr) for post in post_op_attr(path)}


def accepted_success(xid: int) -> bytes:
    """RFC 5531 reply header: xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE of 0 bytes, SUCCESS."""
    return struct.pack(">IIIIII", xid, 1, 0, 0, 0, 0)


@dataclass
class Server:
    root: Path
    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher
    xid: int = 0x1000

    def call(self, prog: int, proc: int, args: bytes) -> bytes:
        """One call through the dispatcher; returns the procedure's result after a checked reply header."""
        self.xid += 1
        record = call_bytes(self.xid, prog, 3, proc, args, auth_sys(os.getuid(), os.getgid()))
        parts = self.loop.run_until_complete(self.dispatcher.handle(record, ("127.0.0.1", 700), "tcp"))
        reply = b"".join(bytes(p) for p in parts)
        head = accepted_success(self.xid)
        assert reply[: len(head)] == head, reply[:24].hex()
        return reply[len(head) :]

    def nfs(self, proc: int, args: bytes) -> bytes:
        return self.call(100003, proc, args)

    def mount(self, path: str) -> bytes:
        body = self.call(100005, 1, Packer().string(path).bytes())
        assert body[:4] == struct.pack(">I", 0), body[:4]
        (n,) = struct.unpack(">I", body[4:8])
        return body[8 : 8 + n]

    def lookup(self, dir_fh: bytes, name: str) -> bytes:
        body = self.nfs(LOOKUP, Packer().opaque(dir_fh).string(name).bytes())
        assert body[:4] == struct.pack(">I", NFS3_OK), body[:4]
        (n,) = struct.unpack(">I", body[4:8])
        return body[8 : 8 + n]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    export, ro = tmp_path / "export", tmp_path / "ro"
    export.mkdir()
    ro.mkdir()
    disk = export / "disk.bin"
    disk.write_bytes(os.urandom(12345))
    os.chmod(disk, 0o640)
    os.link(disk, export / "second-name")  # nlink 2
    os.utime(disk, ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    (export / "sub").mkdir()
    os.symlink("disk.bin", export / "link")
    (ro / "file").write_bytes(b"read only")
    table = ExportTable(HandleCodec(b"g" * 32))
    table.add(Export("/export", LocalFS(export)))
    table.add(Export("/ro", LocalFS(ro), read_only=True))
    dispatcher = Dispatcher()
    nfs, mount = NFSv3(table), MountV3(table)
    dispatcher.register(nfs)
    dispatcher.register(mount)
    loop = asyncio.new_event_loop()
    try:
        yield Server(tmp_path, loop, dispatcher)
    finally:
        nfs.close()
        loop.close()


@pytest.mark.parametrize("name", ["disk.bin", "sub", "link", "."])
def test_getattr_is_fattr3_field_by_field(server: Server, name: str) -> None:
    root = server.mount("/export")
    fh = root if name == "." else server.lookup(root, name)
    path = server.root / "export" / ("" if name == "." else name)
    body = server.nfs(GETATTR, Packer().opaque(fh).bytes())
    assert body == struct.pack(">I", NFS3_OK) + fattr3(path)
    assert len(body) == 4 + 84  # fattr3 is 84 bytes on the wire


def test_fattr3_carries_nanoseconds_and_link_count(server: Server) -> None:
    body = server.nfs(GETATTR, Packer().opaque(server.lookup(server.mount("/export"), "disk.bin")).bytes())
    kind, mode, nlink = struct.unpack(">III", body[4:16])
    assert (kind, mode, nlink) == (NF3REG, 0o640, 2)
    assert struct.unpack(">Q", body[24:32]) == (12345,)
    assert struct.unpack(">II", body[4 + 60 : 4 + 68]) == (1_700_000_000, 123_456_789)  # atime
    assert struct.unpack(">II", body[4 + 68 : 4 + 76]) == (1_600_000_000, 987_654_321)  # mtime


def test_lookup_of_a_missing_name_is_noent_with_the_directory_attributes(server: Server) -> None:
    body = server.nfs(LOOKUP, Packer().opaque(server.mount("/export")).string("nope").bytes())
    assert body[:4] == struct.pack(">I", NFS3ERR_NOENT)
    assert body[4:] in post_op_attr(server.root / "export")


def test_remove_and_rename_of_a_missing_name_are_noent_with_wcc_data(server: Server) -> None:
    root, export = server.mount("/export"), server.root / "export"
    body = server.nfs(REMOVE, Packer().opaque(root).string("nope").bytes())
    assert body[:4] == struct.pack(">I", NFS3ERR_NOENT) and body[4:] in wcc_data(export)
    body = server.nfs(RENAME, Packer().opaque(root).string("nope").opaque(root).string("other").bytes())
    assert body[:4] == struct.pack(">I", NFS3ERR_NOENT)
    assert body[4:] in {a + b for a in wcc_data(export) for b in wcc_data(export)}  # fromdir_wcc, todir_wcc


def test_guarded_create_of_an_existing_name_is_exist_with_wcc_data(server: Server) -> None:
    args = Packer().opaque(server.mount("/export")).string("disk.bin").u32(1)  # createhow3 GUARDED
    args.u32(0).u32(0).u32(0).u32(0).u32(0).u32(0)  # sattr3: nothing set
    body = server.nfs(CREATE, args.bytes())
    assert body[:4] == struct.pack(">I", NFS3ERR_EXIST) and body[4:] in wcc_data(server.root / "export")


def test_write_on_a_read_only_export_is_rofs_with_wcc_data(server: Server) -> None:
    fh = server.lookup(server.mount("/ro"), "file")
    body = server.nfs(WRITE, Packer().opaque(fh).u64(0).u32(3).u32(2).opaque(b"abc").bytes())
    assert body[:4] == struct.pack(">I", NFS3ERR_ROFS) and body[4:] in wcc_data(server.root / "ro" / "file")
    assert (server.root / "ro" / "file").read_bytes() == b"read only"


# A forged handle names no object: each procedure's resfail carries its status and no attributes at all.
NO_ATTR, NO_WCC = FALSE, FALSE + FALSE
FORGED = [
    (GETATTR, b"", b""),
    (SETATTR, struct.pack(">6I", 0, 0, 0, 0, 0, 0) + FALSE, NO_WCC),
    (LOOKUP, Packer().string("x").bytes(), NO_ATTR),
    (ACCESS, struct.pack(">I", 0x3F), NO_ATTR),
    (READLINK, b"", NO_ATTR),
    (READ, struct.pack(">QI", 0, 4096), NO_ATTR),
    (WRITE, Packer().u64(0).u32(3).u32(2).opaque(b"abc").bytes(), NO_WCC),
    (CREATE, Packer().string("x").u32(0).bytes() + struct.pack(">6I", 0, 0, 0, 0, 0, 0), NO_WCC),
    (MKDIR, Packer().string("x").bytes() + struct.pack(">6I", 0, 0, 0, 0, 0, 0), NO_WCC),
    (REMOVE, Packer().string("x").bytes(), NO_WCC),
    (RMDIR, Packer().string("x").bytes(), NO_WCC),
    (READDIR, struct.pack(">QQI", 0, 0, 4096), NO_ATTR),
    (FSSTAT, b"", NO_ATTR),
    (FSINFO, b"", NO_ATTR),
    (PATHCONF, b"", NO_ATTR),
    (COMMIT, struct.pack(">QI", 0, 0), NO_WCC),
]


@pytest.mark.parametrize("proc,rest,tail", FORGED, ids=[str(p) for p, _, _ in FORGED])
def test_a_forged_handle_is_badhandle_with_the_rfc_failure_tail(
    server: Server, proc: int, rest: bytes, tail: bytes
) -> None:
    real = server.mount("/export")
    forged = bytes(real[:-1]) + bytes([real[-1] ^ 1])
    body = server.nfs(proc, Packer().opaque(forged).bytes() + rest)
    assert body == struct.pack(">I", NFS3ERR_BADHANDLE) + tail, body.hex()


def test_rename_with_forged_handles_has_two_empty_wcc_data(server: Server) -> None:
    real = server.mount("/export")
    forged = bytes(real[:-1]) + bytes([real[-1] ^ 1])
    body = server.nfs(RENAME, Packer().opaque(forged).string("a").opaque(forged).string("b").bytes())
    assert body == struct.pack(">I", NFS3ERR_BADHANDLE) + NO_WCC + NO_WCC, body.hex()

"""Over the wire, against ``python -m nfsd``: an old handle of a removed file is STALE once another file has its
inode number (it never reads or writes that file), and a tree deeper than one openat2 path (PATH_MAX) made with
MKDIR is usable and removable (issue 8). A raw RPC client over TCP.
"""

from __future__ import annotations

from pathlib import Path

from nfsd.xdr import Packer
from tests.nfsd_process import PRIVATE_PORTS, NfsdProcess
from tests.rpcclient import RpcClient

OK, STALE = 0, 70
NO_SATTR = Packer().u32(0).u32(0).u32(0).u32(0).u32(0).u32(0).bytes()
NFS = (100003, 3)


def fileid(fh: bytes) -> int:
    return int.from_bytes(fh[2:10], "big")  # the handle's body: version, export id, fileid, generation


class Nfs:
    def __init__(self, port: int) -> None:
        self.c = RpcClient("127.0.0.1", port)

    def make(self, proc: int, d: bytes, name: str) -> bytes:
        """CREATE (8, unchecked) or MKDIR (9) ``name`` in ``d``: the new handle."""
        args = Packer().opaque(d).string(name).bytes() + (Packer().u32(0).bytes() if proc == 8 else b"") + NO_SATTR
        u = self.c.call(*NFS, proc, args)
        assert u.u32() == OK, f"proc {proc} {name!r} failed"
        assert u.bool()
        return bytes(u.opaque(64))

    def dirop(self, proc: int, d: bytes, name: str) -> int:
        return self.c.call(*NFS, proc, Packer().opaque(d).string(name).bytes()).u32()

    def write(self, fh: bytes, data: bytes) -> int:
        return self.c.call(*NFS, 7, Packer().opaque(fh).u64(0).u32(len(data)).u32(2).opaque(data).bytes()).u32()

    def read(self, fh: bytes) -> tuple[int, bytes]:
        u = self.c.call(*NFS, 6, Packer().opaque(fh).u64(0).u32(4096).bytes())
        status = u.u32()
        if status != OK:
            return status, b""
        if u.bool():
            u.fixed(84)
        u.u32()
        u.bool()
        return status, bytes(u.opaque(4096))


def test_an_old_handle_never_reaches_the_file_that_reuses_its_inode(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    with NfsdProcess(export, *PRIVATE_PORTS) as srv:
        root = RpcClient("127.0.0.1", srv.mount_port).mount(str(export))
        nfs = Nfs(srv.nfs_port)
        a = nfs.make(8, root, "a")
        assert nfs.write(a, b"data of a") == OK
        assert nfs.dirop(12, root, "a") == OK
        for i in range(200):
            b = nfs.make(8, root, f"b{i}")
            if fileid(b) == fileid(a):
                break
            assert nfs.dirop(12, root, f"b{i}") == OK
        else:
            raise AssertionError("the file system never reused the inode: cannot test")
        assert nfs.write(b, b"data of b") == OK
        assert nfs.write(a, b"LATE") == STALE
        assert nfs.read(a) == (STALE, b"")
        assert nfs.read(b) == (OK, b"data of b")
        assert (export / f"b{i}").read_bytes() == b"data of b"


def test_a_deep_tree_made_over_nfs_is_usable_and_removable(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    names = [f"{i:02d}" + "d" * 253 for i in range(20)]  # 5120 bytes of path: more than one openat2 takes
    with NfsdProcess(export, *PRIVATE_PORTS) as srv:
        root = RpcClient("127.0.0.1", srv.mount_port).mount(str(export))
        nfs = Nfs(srv.nfs_port)
        dirs = [root]
        for n in names:
            dirs.append(nfs.make(9, dirs[-1], n))
        leaf = nfs.make(8, dirs[-1], "leaf")
        assert nfs.write(leaf, b"deep") == OK
        assert nfs.read(leaf) == (OK, b"deep")
        assert nfs.dirop(12, dirs[-1], "leaf") == OK
        for parent, n in reversed(list(zip(dirs, names, strict=False))):
            assert nfs.dirop(13, parent, n) == OK, f"RMDIR {n[:2]}... failed"
        assert list(export.iterdir()) == []
        assert "unexpected backend error" not in srv.log()

"""NFS version 3 (RFC 1813): all 22 procedures, each decode -> check -> backend call -> encode.

Backend calls run in worker threads: data calls (READ, WRITE, COMMIT) and metadata calls in separate pools,
so a burst of slow reads never delays the GETATTR that ESXi uses as its heartbeat.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nfsd import errors
from nfsd.batchpool import BatchPool
from nfsd.exports import Export, ExportTable
from nfsd.names import check_name, check_symlink_data
from nfsd.ratelog import limited
from nfsd.rpc import Call, Program
from nfsd.vfs import (
    Attr,
    CreateMode,
    FileType,
    NFSError,
    ObjectId,
    SetAttr,
    StableHow,
    Status,
)
from nfsd.xdr import Packer, Unpacker, XDRError

log = logging.getLogger("nfsd.nfs3")

NFS_PROGRAM = 100003
NFS_V3 = 3
FHSIZE3 = 64
MAX_READ = 1 << 20  # FSINFO's rtmax: larger READ counts are clamped (RFC 1813 allows a short read)
MAX_OFFSET = (1 << 63) - 1  # no file is larger (off_t): an offset3/size3 beyond it names nothing
UNBOUNDED = 0xFFFFFFFF  # filename3<> and nfspath3<>: only the bytes left in the record bound them

ACCESS_READ, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_EXTEND, ACCESS_DELETE, ACCESS_EXECUTE = 1, 2, 4, 8, 16, 32

_FATTR_FIELDS = "IIIIIQQIIQQIIIIII"
_FATTR = struct.Struct(">" + _FATTR_FIELDS)
# A successful READ's reply up to its data, in one pack: status, attributes follow, fattr3, count, eof, length.
_READ_OK = struct.Struct(">II" + _FATTR_FIELDS + "III")
_BILLION = 1_000_000_000


def _fattr_values(a: Attr) -> tuple[int, ...]:
    """fattr3's fields in wire order (times as seconds, nanoseconds)."""
    at, mt, ct = a.atime_ns, a.mtime_ns, a.ctime_ns
    return (
        int(a.type),
        a.mode & 0o7777,
        a.nlink,
        a.uid & 0xFFFFFFFF,
        a.gid & 0xFFFFFFFF,
        a.size,
        a.used,
        a.rdev[0],
        a.rdev[1],
        a.fsid,
        a.fileid,
        (at // _BILLION) & 0xFFFFFFFF,
        at % _BILLION,
        (mt // _BILLION) & 0xFFFFFFFF,
        mt % _BILLION,
        (ct // _BILLION) & 0xFFFFFFFF,
        ct % _BILLION,
    )


def pack_fattr(p: Packer, a: Attr) -> None:
    p.buf += _FATTR.pack(*_fattr_values(a))


def _time(ns: int) -> tuple[int, int]:
    s, n = divmod(ns, _BILLION)
    return s & 0xFFFFFFFF, n


def post_op(p: Packer, a: Attr | None) -> None:
    if a is None:
        p.u32(0)
    else:
        p.u32(1)
        pack_fattr(p, a)


def wcc(p: Packer, before: Attr | None, after: Attr | None) -> None:
    if before is None:
        p.u32(0)
    else:
        p.u32(1).u64(before.size)
        p.u32(_time(before.mtime_ns)[0]).u32(_time(before.mtime_ns)[1])
        p.u32(_time(before.ctime_ns)[0]).u32(_time(before.ctime_ns)[1])
    post_op(p, after)


def _encoded(encode: Callable[[Packer], None]) -> bytes:
    p = Packer()
    encode(p)
    return bytes(p.buf)


# What a failed reply carries after its status: RFC 1813's resfail arms, built by the encoders above.
_NO_ATTR = _encoded(lambda p: post_op(p, None))  # post_op_attr, absent
_NO_WCC = _encoded(lambda p: wcc(p, None, None))  # wcc_data, both halves absent

# Every procedure in number order (RFC 1813 section 3), with its resfail tail.
PROCEDURES: tuple[tuple[str, bytes], ...] = (
    ("NULL", b""),
    ("GETATTR", b""),
    ("SETATTR", _NO_WCC),  # obj_wcc
    ("LOOKUP", _NO_ATTR),  # dir_attributes
    ("ACCESS", _NO_ATTR),  # obj_attributes
    ("READLINK", _NO_ATTR),  # symlink_attributes
    ("READ", _NO_ATTR),  # file_attributes
    ("WRITE", _NO_WCC),  # file_wcc
    ("CREATE", _NO_WCC),  # dir_wcc
    ("MKDIR", _NO_WCC),  # dir_wcc
    ("SYMLINK", _NO_WCC),  # dir_wcc
    ("MKNOD", _NO_WCC),  # dir_wcc
    ("REMOVE", _NO_WCC),  # dir_wcc
    ("RMDIR", _NO_WCC),  # dir_wcc
    ("RENAME", _NO_WCC + _NO_WCC),  # fromdir_wcc, todir_wcc
    ("LINK", _NO_ATTR + _NO_WCC),  # file_attributes, linkdir_wcc
    ("READDIR", _NO_ATTR),  # dir_attributes
    ("READDIRPLUS", _NO_ATTR),  # dir_attributes
    ("FSSTAT", _NO_ATTR),  # obj_attributes
    ("FSINFO", _NO_ATTR),  # obj_attributes
    ("PATHCONF", _NO_ATTR),  # obj_attributes
    ("COMMIT", _NO_WCC),  # file_wcc
)


def unpack_time(u: Unpacker, what: str) -> int | None:
    how = u.u32(what)
    if how == 0:
        return None
    if how == 1:
        return -1  # server time
    if how == 2:
        s, n = u.u32x2(what)
        return s * 1_000_000_000 + n
    raise XDRError(f"{what}: time_how {how} is not 0, 1 or 2")


def unpack_sattr(u: Unpacker) -> SetAttr:
    s = SetAttr()
    if u.bool("set_mode"):
        s.mode = u.u32("mode") & 0o7777
    if u.bool("set_uid"):
        s.uid = u.u32("uid")
    if u.bool("set_gid"):
        s.gid = u.u32("gid")
    if u.bool("set_size"):
        s.size = unpack_size(u, "size")
    s.atime_ns = unpack_time(u, "set_atime")
    s.mtime_ns = unpack_time(u, "set_mtime")
    return s


def unpack_name(u: Unpacker, what: str, dots: Status | None = Status.EXIST) -> str:
    """A filename3, judged by nfsd.names (a long one is NAMETOOLONG there, not garbage here)."""
    return check_name(u.string(UNBOUNDED, what), dots)


def unpack_size(u: Unpacker, what: str) -> int:
    size = u.u64(what)
    if size > MAX_OFFSET:
        raise NFSError(Status.FBIG, f"{what} {size} is beyond the largest file size {MAX_OFFSET}")
    return size


def access_bits(attr: Attr, cred_uid: int, cred_gids: set[int], wanted: int, read_only: bool) -> int:
    """The subset of ``wanted`` ACCESS3 bits the mode bits grant (root gets everything but needs an x bit)."""
    if cred_uid == 0:
        granted = ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
        if attr.type == FileType.DIR or attr.mode & 0o111:
            granted |= ACCESS_EXECUTE
    else:
        if cred_uid == attr.uid:
            bits = (attr.mode >> 6) & 7
        elif attr.gid in cred_gids:
            bits = (attr.mode >> 3) & 7
        else:
            bits = attr.mode & 7
        granted = 0
        if bits & 4:
            granted |= ACCESS_READ
        if bits & 2:
            granted |= ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
        if bits & 1:
            granted |= ACCESS_LOOKUP if attr.type == FileType.DIR else ACCESS_EXECUTE
    if attr.type == FileType.DIR and granted & ACCESS_READ:
        granted |= ACCESS_LOOKUP if (cred_uid == 0 or granted & ACCESS_LOOKUP) else 0
    if read_only:
        granted &= ~(ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
    return granted & wanted


def _read_only(export: Export) -> bool:
    """The one read-only rule: the export is configured read-only, or its backend cannot change (a backup
    view). Modifying procedures are refused with ROFS here, before the backend is called."""
    return export.read_only or export.backend.read_only


def _new_verifier() -> bytes:
    """A write verifier no earlier one of this server had (time and randomness)."""
    return struct.pack(">Q", time.time_ns() ^ int.from_bytes(os.urandom(8), "big"))


class NFSv3(Program):
    prog = NFS_PROGRAM
    vers = NFS_V3
    name = "NFSv3"

    def __init__(
        self,
        exports: ExportTable,
        meta_workers: int = 8,
        io_workers: int = 16,
        write_workers: int = 2,
        error_statuses: tuple[errors.StatusMapping, ...] = (),
    ) -> None:
        """``error_statuses``: (exception class, nfsstat3) pairs for the domain errors of the backends."""
        self.exports = exports
        self.errors = errors.ErrorTable(error_statuses)
        self.meta_pool = ThreadPoolExecutor(meta_workers, thread_name_prefix="nfs-meta")
        self.io_pool = ThreadPoolExecutor(io_workers, thread_name_prefix="nfs-io")
        # Writes to one file serialize in the backend anyway; a few threads avoid a convoy of sixteen.
        self.write_pool = BatchPool(write_workers, name="nfs-write")
        # Changes at every start, so clients know to resend UNSTABLE writes the server may have lost.
        self.write_verifier = _new_verifier()
        self.stats: dict[str, int] = {}

    def requires_auth_sys(self, proc: int) -> bool:
        return False  # AUTH_NONE callers are treated as nobody

    def procedures(self) -> dict[int, Callable]:
        return {i: self._wrap(getattr(self, f"NFSPROC3_{name}"), tail) for i, (name, tail) in enumerate(PROCEDURES)}

    def _wrap(self, fn: Callable, tail: bytes) -> Callable:
        writes = fn.__name__ in ("NFSPROC3_WRITE", "NFSPROC3_COMMIT")

        async def handler(call: Call) -> list:
            try:
                return await fn(call)
            except XDRError:
                raise
            except Exception as exc:  # noqa: BLE001 - every backend failure becomes an nfsstat3
                if writes and isinstance(exc, OSError) and exc.errno != errno.ESTALE:
                    # A failed write or sync may have lost UNSTABLE writes already answered (after a failed
                    # fsync the kernel may drop the pages, and the next fsync succeeds): a new verifier makes
                    # every client resend what it has not seen committed, as Linux's nfsd does.
                    self.write_verifier = _new_verifier()
                    limited.log(
                        log,
                        logging.ERROR,
                        "%s failed (%s): new write verifier, clients resend their uncommitted writes",
                        fn.__name__[8:],
                        exc,
                    )
                status = self.errors.status_for(exc)
                return [struct.pack(">I", int(status)) + tail]

        return handler

    # --- helpers --------------------------------------------------------------------------------------
    def _resolve(self, call: Call, u: Unpacker, modifying: bool = False) -> tuple[Export, ObjectId]:
        fh = u.opaque(FHSIZE3, "nfs_fh3")
        export, obj = self.exports.resolve(fh)
        if not export.allows(call.address[0]):
            raise NFSError(Status.ACCES, f"{call.address[0]} may not use {export.path}")
        if export.require_privileged_port and not call.privileged_port:
            raise NFSError(Status.PERM, "privileged source port required")
        if modifying and _read_only(export):
            raise NFSError(Status.ROFS, f"{export.path} is read-only")
        return export, obj

    async def _meta(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.meta_pool, fn, *args)

    async def _io(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    def _attr_or_none(self, export: Export, obj: ObjectId) -> Attr | None:
        try:
            return export.backend.getattr(obj)
        except Exception:  # noqa: BLE001 - post-op attributes are optional
            return None

    def _handle_attr(self, p: Packer, export: Export, obj: ObjectId) -> None:
        """post_op_fh3 + post_op_attr of a new or looked-up object."""
        p.u32(1).opaque(self.exports.handle(export, obj))
        post_op(p, self._attr_or_none(export, obj))

    # --- procedures -----------------------------------------------------------------------------------
    async def NFSPROC3_NULL(self, call: Call) -> list:
        return []

    async def NFSPROC3_GETATTR(self, call: Call) -> list:
        export, obj = self._resolve(call, call.args)
        attr = export.backend.getattr_nowait(obj)
        if attr is None:
            attr = await self._meta(export.backend.getattr, obj)
        p = Packer().u32(0)
        pack_fattr(p, attr)
        return [p.buf]

    async def NFSPROC3_SETATTR(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u, modifying=True)
        sattr = unpack_sattr(u)
        guard = u.u32x2("guard ctime") if u.bool("guard") else None
        cred = export.effective(call.cred)

        def do() -> tuple[Attr, Attr]:
            before = export.backend.getattr(obj)
            if guard is not None and _time(before.ctime_ns) != guard:
                raise NFSError(Status.NOT_SYNC)
            return before, export.backend.setattr(obj, sattr, cred)

        before, after = await self._meta(do)
        p = Packer().u32(0)
        wcc(p, before, after)
        return [p.buf]

    async def NFSPROC3_LOOKUP(self, call: Call) -> list:
        u = call.args
        export, d = self._resolve(call, u)
        name = unpack_name(u, "name", dots=None)

        def do() -> tuple[ObjectId, Attr | None, Attr | None]:
            if name == ".":
                child = d
            elif name == "..":
                child = export.backend.parent(d)
            else:
                child = export.backend.lookup(d, name)
            return child, self._attr_or_none(export, child), self._attr_or_none(export, d)

        try:
            child, cattr, dattr = await self._meta(do)
        except Exception as exc:  # noqa: BLE001
            status = self.errors.status_for(exc)
            p = Packer().u32(int(status))
            post_op(p, await self._meta(self._attr_or_none, export, d))
            return [p.buf]
        p = Packer().u32(0).opaque(self.exports.handle(export, child))
        post_op(p, cattr)
        post_op(p, dattr)
        return [p.buf]

    async def NFSPROC3_ACCESS(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u)
        wanted = u.u32("access")
        attr = export.backend.getattr_nowait(obj)
        if attr is None:
            attr = await self._meta(export.backend.getattr, obj)
        cred = export.effective(call.cred)
        granted = access_bits(attr, cred.uid, {cred.gid, *cred.gids}, wanted, _read_only(export))
        p = Packer().u32(0)
        post_op(p, attr)
        p.u32(granted)
        return [p.buf]

    async def NFSPROC3_READLINK(self, call: Call) -> list:
        export, obj = self._resolve(call, call.args)
        target = await self._meta(export.backend.readlink, obj)
        p = Packer().u32(0)
        post_op(p, await self._meta(self._attr_or_none, export, obj))
        p.string(target)
        return [p.buf]

    async def NFSPROC3_READ(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u)
        # An offset past the largest file size reads nothing, like one past the end (Linux clamps it too).
        offset, count = min(u.u64("offset"), MAX_OFFSET), min(u.u32("count"), MAX_READ, call.max_data)
        await call.reserve(count + 128)  # room for the reply before reading: a client that stops reading stalls
        # Most reads of a running VM hit memory (chunk cache, page cache): answer those right here, and
        # only hop to a worker thread when the backend would have to wait for a disk.
        fast = export.backend.read_nowait(obj, offset, count)
        if fast is not None:
            data, eof, attr = fast
        else:

            def do() -> tuple[Any, bool, Attr | None]:
                data, eof = export.backend.read(obj, offset, count)
                return data, eof, self._attr_or_none(export, obj)

            data, eof, attr = await self._io(do)
        n = len(data)
        if attr is not None:
            head: bytes | bytearray = _READ_OK.pack(0, 1, *_fattr_values(attr), n, 1 if eof else 0, n)
        else:
            head = Packer().u32(0).u32(0).u32(n).bool(eof).u32(n).buf
        pad = -n % 4
        return [head, data, b"\0" * pad] if pad else [head, data]

    async def NFSPROC3_WRITE(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u, modifying=True)
        offset, count, stable = u.u64("offset"), u.u32("count"), u.u32("stable")
        if stable > 2:
            raise XDRError(f"stable_how {stable}")
        data = u.opaque(1 << 24, "data")
        if count != len(data):
            raise NFSError(Status.INVAL, f"count {count} != data length {len(data)}")
        if offset + count > MAX_OFFSET:
            raise NFSError(Status.FBIG, f"write of {count} bytes at {offset} ends beyond {MAX_OFFSET}")
        verifier = self.write_verifier  # as before the write: a failure meanwhile must make the client resend it

        # An UNSTABLE write into blocks a disk's cache holds already is a pwrite into the page cache: done
        # here, without the trip to the write pool and back; anything that may wait goes to the pool.
        fast = export.backend.write_nowait(obj, offset, data, StableHow(stable))
        if fast is not None:
            result, attr = fast
        else:

            def do() -> tuple[Any, Attr | None]:
                result = export.backend.write(obj, offset, data, StableHow(stable))
                return result, self._attr_or_none(export, obj)

            result, attr = await self.write_pool.submit(do)
        p = Packer().u32(0)
        wcc(p, None, attr)
        p.u32(result.count).u32(int(result.committed)).fixed(verifier)
        return [p.buf]

    async def _created(self, call: Call, export: Export, d: ObjectId, fn: Callable) -> list:
        def do() -> tuple[ObjectId, Attr | None, Attr | None]:
            obj = fn()
            return obj, self._attr_or_none(export, obj), self._attr_or_none(export, d)

        try:
            obj, attr, dattr = await self._meta(do)
        except Exception as exc:  # noqa: BLE001
            p = Packer().u32(int(self.errors.status_for(exc)))
            wcc(p, None, await self._meta(self._attr_or_none, export, d))
            return [p.buf]
        p = Packer().u32(0).u32(1).opaque(self.exports.handle(export, obj))
        post_op(p, attr)
        wcc(p, None, dattr)
        return [p.buf]

    async def NFSPROC3_CREATE(self, call: Call) -> list:
        u = call.args
        export, d = self._resolve(call, u, modifying=True)
        name = unpack_name(u, "name")
        mode = u.u32("createmode")
        if mode > 2:
            raise XDRError(f"createmode {mode}")
        verifier = None
        sattr = SetAttr()
        if mode == CreateMode.EXCLUSIVE:
            verifier = bytes(u.fixed(8, "createverf3"))
        else:
            sattr = unpack_sattr(u)
        cred = export.effective(call.cred)
        return await self._created(
            call, export, d, lambda: export.backend.create(d, name, CreateMode(mode), sattr, verifier, cred)
        )

    async def NFSPROC3_MKDIR(self, call: Call) -> list:
        u = call.args
        export, d = self._resolve(call, u, modifying=True)
        name = unpack_name(u, "name")
        sattr = unpack_sattr(u)
        cred = export.effective(call.cred)
        return await self._created(call, export, d, lambda: export.backend.mkdir(d, name, sattr, cred))

    async def NFSPROC3_SYMLINK(self, call: Call) -> list:
        u = call.args
        export, d = self._resolve(call, u, modifying=True)
        name = unpack_name(u, "name")
        sattr = unpack_sattr(u)
        target = check_symlink_data(u.string(UNBOUNDED, "symlink data"))
        cred = export.effective(call.cred)
        return await self._created(call, export, d, lambda: export.backend.symlink(d, name, target, sattr, cred))

    async def NFSPROC3_MKNOD(self, call: Call) -> list:
        u = call.args
        self._resolve(call, u, modifying=True)
        unpack_name(u, "name")
        ftype = u.u32("ftype")
        if ftype in (FileType.CHR, FileType.BLK):
            unpack_sattr(u)
            u.u32x2("specdata")
        elif ftype in (FileType.SOCK, FileType.FIFO):
            unpack_sattr(u)
        elif ftype not in (FileType.REG, FileType.DIR, FileType.LNK):
            raise XDRError(f"ftype {ftype}")
        # Device nodes, sockets and FIFOs have no place in a VM datastore: refused, cleanly.
        raise NFSError(Status.NOTSUPP if ftype in (3, 4, 6, 7) else Status.BADTYPE)

    async def _removed(self, call: Call, fn_name: str) -> list:
        u = call.args
        export, d = self._resolve(call, u, modifying=True)
        name = unpack_name(u, "name", dots=Status.ACCES)
        fn = getattr(export.backend, fn_name)

        def do() -> Attr | None:
            fn(d, name)
            return self._attr_or_none(export, d)

        dattr = await self._meta(do)
        p = Packer().u32(0)
        wcc(p, None, dattr)
        return [p.buf]

    async def NFSPROC3_REMOVE(self, call: Call) -> list:
        return await self._removed(call, "remove")

    async def NFSPROC3_RMDIR(self, call: Call) -> list:
        return await self._removed(call, "rmdir")

    async def NFSPROC3_RENAME(self, call: Call) -> list:
        u = call.args
        export, fd = self._resolve(call, u, modifying=True)
        fname = unpack_name(u, "from name", dots=Status.ACCES)
        export2, td = self._resolve(call, u, modifying=True)
        tname = unpack_name(u, "to name", dots=Status.ACCES)
        if export2 is not export:
            raise NFSError(Status.XDEV)

        def do() -> tuple[Attr | None, Attr | None]:
            export.backend.rename(fd, fname, td, tname)
            return self._attr_or_none(export, fd), self._attr_or_none(export, td)

        a1, a2 = await self._meta(do)
        p = Packer().u32(0)
        wcc(p, None, a1)
        wcc(p, None, a2)
        return [p.buf]

    async def NFSPROC3_LINK(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u, modifying=True)
        export2, d = self._resolve(call, u, modifying=True)
        name = unpack_name(u, "name")
        if export2 is not export:
            raise NFSError(Status.XDEV)

        def do() -> tuple[Attr | None, Attr | None]:
            export.backend.link(obj, d, name)
            return self._attr_or_none(export, obj), self._attr_or_none(export, d)

        a1, a2 = await self._meta(do)
        p = Packer().u32(0)
        post_op(p, a1)
        wcc(p, None, a2)
        return [p.buf]

    async def _readdir(self, call: Call, plus: bool) -> list:
        u = call.args
        export, d = self._resolve(call, u)
        cookie = u.u64("cookie")
        verifier = u.u64("cookieverf")
        dircount = u.u32("dircount") if plus else 0
        maxcount = u.u32("maxcount" if plus else "count")
        maxcount = max(512, min(maxcount, 1 << 20, call.max_data))
        await call.reserve(maxcount)
        budget = maxcount - 128  # status, dir attributes, verifier, eof

        def do() -> tuple[Packer, Attr | None, int]:
            res = export.backend.readdir(d, cookie, verifier, maxcount)
            body = Packer()
            used = names = 0
            complete = True
            for e in res.entries:
                entry = Packer().u32(1).u64(e.obj.fileid).string(e.name).u64(e.cookie)
                if plus:
                    attr = self._attr_or_none(export, e.obj)
                    post_op(entry, attr)
                    entry.u32(1).opaque(self.exports.handle(export, e.obj))
                names += 24 + len(e.name)
                if used + len(entry.buf) > budget or (plus and dircount and names > dircount and used):
                    complete = False
                    break
                body.buf += entry.buf
                used += len(entry.buf)
            if not used and res.entries:
                raise NFSError(Status.TOOSMALL)
            body.u32(0).bool(res.eof and complete)
            return body, self._attr_or_none(export, d), res.verifier

        body, dattr, new_verifier = await self._meta(do)
        p = Packer().u32(0)
        post_op(p, dattr)
        p.u64(new_verifier)
        return [p.buf, body.buf]

    async def NFSPROC3_READDIR(self, call: Call) -> list:
        return await self._readdir(call, plus=False)

    async def NFSPROC3_READDIRPLUS(self, call: Call) -> list:
        return await self._readdir(call, plus=True)

    async def NFSPROC3_FSSTAT(self, call: Call) -> list:
        export, obj = self._resolve(call, call.args)

        def do() -> tuple[Any, Attr | None]:
            return export.backend.fsstat(obj), self._attr_or_none(export, obj)

        st, attr = await self._meta(do)
        p = Packer().u32(0)
        post_op(p, attr)
        p.u64(st.total_bytes).u64(st.free_bytes).u64(st.avail_bytes)
        p.u64(st.total_files).u64(st.free_files).u64(st.avail_files).u32(0)
        return [p.buf]

    async def NFSPROC3_FSINFO(self, call: Call) -> list:
        export, obj = self._resolve(call, call.args)
        info, attr = await self._meta(lambda: (export.backend.fsinfo(obj), self._attr_or_none(export, obj)))
        p = Packer().u32(0)
        post_op(p, attr)
        rtmax, rtpref, dtpref = (min(v, call.max_data) for v in (info.rtmax, info.rtpref, info.dtpref))  # UDP: small
        p.u32(rtmax).u32(rtpref).u32(4096).u32(info.wtmax).u32(info.wtpref).u32(4096)
        p.u32(dtpref).u64(info.maxfilesize).u32(0).u32(1).u32(info.properties)  # time_delta 1 ns
        return [p.buf]

    async def NFSPROC3_PATHCONF(self, call: Call) -> list:
        export, obj = self._resolve(call, call.args)
        pc, attr = await self._meta(lambda: (export.backend.pathconf(obj), self._attr_or_none(export, obj)))
        p = Packer().u32(0)
        post_op(p, attr)
        p.u32(pc.linkmax).u32(pc.name_max).bool(pc.no_trunc).bool(pc.chown_restricted)
        p.bool(pc.case_insensitive).bool(pc.case_preserving)
        return [p.buf]

    async def NFSPROC3_COMMIT(self, call: Call) -> list:
        u = call.args
        export, obj = self._resolve(call, u, modifying=True)
        offset, count = u.u64("offset"), u.u32("count")

        def do() -> Attr | None:
            export.backend.commit(obj, offset, count)
            return self._attr_or_none(export, obj)

        attr = await self._io(do)
        p = Packer().u32(0)
        wcc(p, None, attr)
        # as after the sync: a failure of another sync meanwhile may have lost pages this one then found clean
        p.fixed(self.write_verifier)
        return [p.buf]

    def close(self) -> None:
        self.meta_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.write_pool.shutdown()

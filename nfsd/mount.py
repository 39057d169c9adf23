"""MOUNT version 3 (RFC 1813 appendix I): MNT, DUMP, UMNT, UMNTALL, EXPORT."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nfsd.exports import ExportTable
from nfsd.names import check_name
from nfsd.ratelog import limited
from nfsd.rpc import Call, Program
from nfsd.vfs import FileType, NFSError, Status
from nfsd.xdr import Packer

log = logging.getLogger("nfsd.mount")

MOUNT_PROGRAM = 100005
MOUNT_V3 = 3
MNTPATHLEN = 1024
MNT3_OK, MNT3ERR_NOENT, MNT3ERR_ACCES, MNT3ERR_NOTDIR, MNT3ERR_INVAL, MNT3ERR_NAMETOOLONG = 0, 2, 13, 20, 22, 63
MNT3ERR_SERVERFAULT = 10006
AUTH_NONE, AUTH_SYS = 0, 1
# nfsstat3 of a failed walk below the export -> mountstat3 (anything else: MNT3ERR_ACCES)
_MOUNTSTAT = {
    Status.NOENT: MNT3ERR_NOENT,
    Status.STALE: MNT3ERR_NOENT,
    Status.NOTDIR: MNT3ERR_NOTDIR,
    Status.INVAL: MNT3ERR_INVAL,
    Status.NAMETOOLONG: MNT3ERR_NAMETOOLONG,
}
MAX_MOUNT_RECORDS = 1024  # (client, export) pairs kept for DUMP; the oldest is forgotten beyond it


class MountV3(Program):
    prog = MOUNT_PROGRAM
    vers = MOUNT_V3
    name = "MOUNTv3"

    def __init__(self, exports: ExportTable) -> None:
        self.exports = exports
        # (client address, export path), for DUMP and the admin page; a dict keeps them oldest first
        self.mounts: dict[tuple[str, str], None] = {}

    def procedures(self) -> dict[int, Callable]:
        return {0: self.NULL, 1: self.MNT, 2: self.DUMP, 3: self.UMNT, 4: self.UMNTALL, 5: self.EXPORT}

    async def NULL(self, call: Call) -> list:
        return []

    async def MNT(self, call: Call) -> list:
        path = call.args.string(MNTPATHLEN, "dirpath")
        export, rest = self.exports.containing(path)
        client = call.address[0]
        if export is None:
            limited.log(log, logging.INFO, "mount of unknown export %r from %s", path[:200], client)
            return [Packer().u32(MNT3ERR_NOENT).buf]
        if not export.allows(client) or (export.require_privileged_port and not call.privileged_port):
            limited.log(log, logging.WARNING, "refused mount of %s from %s", export.path, client)
            return [Packer().u32(MNT3ERR_ACCES).buf]
        try:
            root = export.backend.root()
            # Clients may mount a directory below the export (libnfs mounts the whole URL path).
            for name in rest:
                root = export.backend.lookup(root, check_name(name, dots=Status.ACCES))
            if export.backend.getattr(root).type != FileType.DIR:
                return [Packer().u32(MNT3ERR_NOTDIR).buf]
        except NFSError as exc:
            return [Packer().u32(_MOUNTSTAT.get(exc.status, MNT3ERR_ACCES)).buf]
        except Exception:  # noqa: BLE001 - a broken backend must not take the mount daemon down
            log.exception("export %s has no usable root", export.path)
            return [Packer().u32(MNT3ERR_SERVERFAULT).buf]
        self.mounts.pop((client, export.path), None)
        self.mounts[(client, export.path)] = None
        while len(self.mounts) > MAX_MOUNT_RECORDS:
            del self.mounts[next(iter(self.mounts))]
        p = Packer().u32(MNT3_OK).opaque(self.exports.handle(export, root))
        p.u32(2).u32(AUTH_SYS).u32(AUTH_NONE)
        return [p.buf]

    async def DUMP(self, call: Call) -> list:
        p = Packer()
        for client, path in sorted(self.mounts):
            p.u32(1).string(client).string(path)
        p.u32(0)
        return [p.buf]

    async def UMNT(self, call: Call) -> list:
        path = "/" + call.args.string(MNTPATHLEN, "dirpath").strip("/")
        self.mounts.pop((call.address[0], path), None)
        return []

    async def UMNTALL(self, call: Call) -> list:
        self.mounts = {m: None for m in self.mounts if m[0] != call.address[0]}
        return []

    async def EXPORT(self, call: Call) -> list:
        p = Packer()
        for export in self.exports.all():
            p.u32(1).string(export.path)
            for network in export.clients:
                p.u32(1).string("*" if network in ("0.0.0.0/0", "::/0") else network)
            p.u32(0)
        p.u32(0)
        return [p.buf]

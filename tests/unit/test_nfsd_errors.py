"""nfsd.errors.ErrorTable: the one exception -> nfsstat3 table. Expected numbers are RFC 1813's, written out."""

from __future__ import annotations

import errno

import pytest

from nfsd.errors import ErrorTable
from nfsd.vfs import NFSError, Status

# errno -> RFC 1813 nfsstat3 number
RFC_STATUS = {
    errno.EPERM: 1,  # NFS3ERR_PERM
    errno.ENOENT: 2,  # NFS3ERR_NOENT
    errno.EIO: 5,  # NFS3ERR_IO
    errno.ENXIO: 6,  # NFS3ERR_NXIO
    errno.EACCES: 13,  # NFS3ERR_ACCES
    errno.EEXIST: 17,  # NFS3ERR_EXIST
    errno.EXDEV: 18,  # NFS3ERR_XDEV
    errno.ENODEV: 19,  # NFS3ERR_NODEV
    errno.ENOTDIR: 20,  # NFS3ERR_NOTDIR
    errno.EISDIR: 21,  # NFS3ERR_ISDIR
    errno.EINVAL: 22,  # NFS3ERR_INVAL
    errno.EFBIG: 27,  # NFS3ERR_FBIG
    errno.ENOSPC: 28,  # NFS3ERR_NOSPC
    errno.EROFS: 30,  # NFS3ERR_ROFS
    errno.EMLINK: 31,  # NFS3ERR_MLINK
    errno.ENAMETOOLONG: 63,  # NFS3ERR_NAMETOOLONG
    errno.ENOTEMPTY: 66,  # NFS3ERR_NOTEMPTY
    errno.EDQUOT: 69,  # NFS3ERR_DQUOT
    errno.ESTALE: 70,  # NFS3ERR_STALE
    errno.ELOOP: 22,  # a symlink met where a directory was walked: INVAL (v3 has no ELOOP)
    errno.EOPNOTSUPP: 10004,  # NFS3ERR_NOTSUPP
}
SERVERFAULT = 10006


class CacheFull(Exception):
    pass


class CacheReallyFull(CacheFull):
    pass


class Damaged(Exception):
    pass


@pytest.mark.parametrize("code", sorted(RFC_STATUS), ids=[errno.errorcode[c] for c in sorted(RFC_STATUS)])
def test_each_errno_maps_to_its_rfc_status(code: int) -> None:
    assert int(ErrorTable().status_for(OSError(code, "x"))) == RFC_STATUS[code]
    # the OSError subclasses Python raises for an errno map the same way
    assert int(ErrorTable().status_for(OSError(code, "x", "/some/path"))) == RFC_STATUS[code]


def test_errno_subclasses_from_the_standard_library_map_by_errno() -> None:
    table = ErrorTable()
    assert int(table.status_for(FileNotFoundError(errno.ENOENT, "gone"))) == 2
    assert int(table.status_for(PermissionError(errno.EACCES, "no"))) == 13
    assert int(table.status_for(IsADirectoryError(errno.EISDIR, "dir"))) == 21


def test_registered_domain_errors_map_to_their_status_subclasses_too() -> None:
    table = ErrorTable([(CacheFull, Status.NOSPC), (Damaged, Status.IO)])
    assert int(table.status_for(CacheFull("cache 'x' full"))) == 28
    assert int(table.status_for(CacheReallyFull("more"))) == 28
    assert int(table.status_for(Damaged("chunk 12ab"))) == 5
    assert int(ErrorTable().status_for(CacheFull("unregistered"))) == SERVERFAULT  # only where given


def test_nfserror_keeps_its_own_status_before_any_mapping() -> None:
    table = ErrorTable([(Exception, Status.IO)])  # even a catch-all domain mapping does not override it
    assert int(table.status_for(NFSError(Status.STALE))) == 70
    assert int(table.status_for(NFSError(Status.BADHANDLE))) == 10001


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EAGAIN, "again"),
        OSError(errno.EBADF, "bad fd"),
        OSError("no errno"),
        ValueError("bug"),
        KeyError("k"),
        RuntimeError("r"),
    ],
    ids=["EAGAIN", "EBADF", "no-errno", "ValueError", "KeyError", "RuntimeError"],
)
def test_anything_unknown_is_serverfault(exc: BaseException) -> None:
    assert int(ErrorTable([(CacheFull, Status.NOSPC)]).status_for(exc)) == SERVERFAULT

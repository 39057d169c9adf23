"""The one table that turns exceptions from backends into nfsstat3 (STYLE.md rule 4)."""

from __future__ import annotations

import errno
import logging

from nfsd.ratelog import limited
from nfsd.vfs import NFSError, Status

log = logging.getLogger("nfsd")

_ERRNO = {
    errno.EPERM: Status.PERM,
    errno.ENOENT: Status.NOENT,
    errno.EIO: Status.IO,
    errno.ENXIO: Status.NXIO,
    errno.EACCES: Status.ACCES,
    errno.EEXIST: Status.EXIST,
    errno.EXDEV: Status.XDEV,
    errno.ENODEV: Status.NODEV,
    errno.ENOTDIR: Status.NOTDIR,
    errno.EISDIR: Status.ISDIR,
    errno.EINVAL: Status.INVAL,
    errno.EFBIG: Status.FBIG,
    errno.ENOSPC: Status.NOSPC,
    errno.EROFS: Status.ROFS,
    errno.EMLINK: Status.MLINK,
    errno.ENAMETOOLONG: Status.NAMETOOLONG,
    errno.ENOTEMPTY: Status.NOTEMPTY,
    errno.EDQUOT: Status.DQUOT,
    errno.ESTALE: Status.STALE,
    errno.ELOOP: Status.INVAL,
    errno.EOPNOTSUPP: Status.NOTSUPP,
}

StatusMapping = tuple[type[BaseException], Status]


class ErrorTable:
    """One server's exception -> nfsstat3 table: NFSError's own status, then the domain errors of the layers
    above (given by whoever builds the server, e.g. the appliance's NoSpaceError -> NOSPC, so this package
    knows nothing about them), then errno; anything else is a bug: SERVERFAULT, logged."""

    def __init__(self, extra: tuple[StatusMapping, ...] | list[StatusMapping] = ()) -> None:
        self.extra = tuple(extra)

    def status_for(self, exc: BaseException) -> Status:
        if isinstance(exc, NFSError):
            return exc.status
        for exc_type, status in self.extra:
            if isinstance(exc, exc_type):
                limited.log(log, logging.WARNING, "%s: %s", status.name, exc)  # a client can cause one per call
                return status
        if isinstance(exc, OSError) and exc.errno in _ERRNO:
            return _ERRNO[exc.errno]
        limited.log(log, logging.ERROR, "unexpected backend error: %s", exc, exc_info=exc)
        return Status.SERVERFAULT

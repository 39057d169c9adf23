"""The backend interface the NFS protocol layer calls, and the errors backends raise.

A backend serves one export. It names its objects by a 64-bit ``fileid`` (unique and stable across restarts:
ESXi names its ``.lck-<fileid>`` files after them) plus a 32-bit ``generation`` that changes when a fileid is
reused, so stale handles are detected. Methods are synchronous and may block: the protocol layer runs them in
worker threads, metadata and data calls in separate pools, so a slow read never delays a GETATTR heartbeat.
Backends raise ``NFSError(status)`` with an ``nfsstat3`` value; the protocol layer maps anything else to
NFS3ERR_IO or NFS3ERR_SERVERFAULT in one place (``nfsd.errors``).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nfsd.filerange import FileRange


class Status(enum.IntEnum):
    """nfsstat3 (RFC 1813 section 2.6)."""

    OK = 0
    PERM = 1
    NOENT = 2
    IO = 5
    NXIO = 6
    ACCES = 13
    EXIST = 17
    XDEV = 18
    NODEV = 19
    NOTDIR = 20
    ISDIR = 21
    INVAL = 22
    FBIG = 27
    NOSPC = 28
    ROFS = 30
    MLINK = 31
    NAMETOOLONG = 63
    NOTEMPTY = 66
    DQUOT = 69
    STALE = 70
    REMOTE = 71
    BADHANDLE = 10001
    NOT_SYNC = 10002
    BAD_COOKIE = 10003
    NOTSUPP = 10004
    TOOSMALL = 10005
    SERVERFAULT = 10006
    BADTYPE = 10007
    JUKEBOX = 10008


class NFSError(Exception):
    """A failure with a definite nfsstat3 meaning."""

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(message or status.name)
        self.status = Status(status)


class FileType(enum.IntEnum):
    """ftype3."""

    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


class StableHow(enum.IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class CreateMode(enum.IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


@dataclass(frozen=True)
class ObjectId:
    fileid: int
    generation: int = 0


@dataclass
class Attr:
    """fattr3. Times are nanoseconds since the epoch."""

    type: FileType
    mode: int  # permission bits only (07777)
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: tuple[int, int] = (0, 0)
    fsid: int = 0


@dataclass
class SetAttr:
    """sattr3: None means 'do not change'. ``atime_ns``/``mtime_ns`` of -1 mean 'set to server time'."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    def empty(self) -> bool:
        return all(v is None for v in (self.mode, self.uid, self.gid, self.size, self.atime_ns, self.mtime_ns))


@dataclass
class Cred:
    """Who is asking (AUTH_SYS, or nobody for AUTH_NONE) and from where."""

    uid: int = 65534
    gid: int = 65534
    gids: tuple[int, ...] = ()
    machine: str = ""
    address: str = ""


@dataclass
class DirEntry:
    name: str
    obj: ObjectId
    cookie: int  # opaque position to resume *after* this entry


@dataclass
class FsStat:
    total_bytes: int
    free_bytes: int
    avail_bytes: int
    total_files: int
    free_files: int
    avail_files: int


@dataclass
class WriteResult:
    count: int
    committed: StableHow


@dataclass
class FsInfo:
    rtmax: int = 1 << 20
    rtpref: int = 1 << 20
    wtmax: int = 1 << 20
    wtpref: int = 1 << 20
    dtpref: int = 64 * 1024
    maxfilesize: int = (1 << 63) - 1
    properties: int = 0x1B  # FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME


@dataclass
class PathConf:
    linkmax: int = 32000
    name_max: int = 255
    no_trunc: bool = True
    chown_restricted: bool = True
    case_insensitive: bool = False
    case_preserving: bool = True


@dataclass
class ReadDirResult:
    entries: list[DirEntry]
    eof: bool
    verifier: int = 0
    extra: dict = field(default_factory=dict)


READDIR_ENTRY_BYTES = 16  # no entry takes fewer bytes in a reply: a page never holds more than count // 16
READDIR_MIN_ENTRIES = 16


def names_verifier(names: Sequence[str]) -> int:
    """A non-zero 64-bit cookie verifier for a directory holding ``names`` in this order."""
    digest = hashlib.blake2b(digest_size=8)
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return int.from_bytes(digest.digest(), "big") or 1


def readdir_page(
    directory: ObjectId,
    parent: ObjectId,
    names: Sequence[str],
    cookie: int,
    verifier: int,
    count: int,
    resolve: Callable[[int, str], ObjectId | None],
) -> ReadDirResult:
    """READDIR cookie paging, the one place every backend uses (STYLE.md rule 15).

    ``names`` are the directory's entries without '.' and '..', in a stable (sorted) order. Cookies: 1 is '.',
    2 is '..', 3 + i is ``names[i]``; a page starts after ``cookie`` and holds at most ``max(count // 16, 16)``
    entries. The verifier is a hash of the names, so it changes exactly when cookies stop meaning the same
    positions (a directory's mtime can miss a change made within the same clock tick, and changes when only
    times are set): a non-zero cookie with a non-zero ``verifier`` that is no longer the names' is
    NFSError(BAD_COOKIE). ``resolve(i, name)`` gives the object of ``names[i]`` for this page only (so a backend
    stats no more than a page), or None if it vanished meanwhile: it is left out, the other cookies keep theirs."""
    current = names_verifier(names)
    if cookie and verifier and verifier != current:
        raise NFSError(Status.BAD_COOKIE, f"directory {directory.fileid} changed since the listing began")
    entries: list[DirEntry] = []
    if cookie < 1:
        entries.append(DirEntry(".", directory, 1))
    if cookie < 2:
        entries.append(DirEntry("..", parent, 2))
    start = max(0, cookie - 2)
    stop = min(len(names), start + max(0, max(count // READDIR_ENTRY_BYTES, READDIR_MIN_ENTRIES) - len(entries)))
    for i in range(start, stop):
        obj = resolve(i, names[i])
        if obj is not None:
            entries.append(DirEntry(names[i], obj, 3 + i))
    return ReadDirResult(entries, eof=stop >= len(names), verifier=current)


class Backend:
    """What an export serves. Subclasses override what they support; the rest answers NFS3ERR_NOTSUPP.

    ``read_only`` is the backend's own fact (a backup view, a directory opened read-only): the protocol layer
    then refuses every modifying procedure with ROFS before calling the backend, as for a read-only export,
    so a read-only backend only implements the read side and needs no checks of its own."""

    read_only: bool = False

    # --- identity and attributes ---------------------------------------------------------------------
    def root(self) -> ObjectId:
        raise NotImplementedError

    def check(self, obj: ObjectId) -> None:
        """Raise NFSError(STALE) if ``obj`` no longer exists or its generation changed."""
        self.getattr(obj)

    def getattr(self, obj: ObjectId) -> Attr:
        raise NotImplementedError

    def getattr_nowait(self, obj: ObjectId) -> Attr | None:
        """``getattr`` when the attributes are at hand in memory (no system call that could wait for a disk);
        None means "ask ``getattr`` in a worker thread". Called on the event loop, like ``read_nowait``: a
        hypervisor's heartbeat GETATTR should not queue behind other work. The default never tries."""
        return None

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        raise NFSError(Status.NOTSUPP)

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        raise NotImplementedError

    def parent(self, directory: ObjectId) -> ObjectId:
        """The object named '..' in ``directory`` (the root is its own parent)."""
        raise NotImplementedError

    # --- data -----------------------------------------------------------------------------------------
    def read(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes | memoryview, bool]:
        """Up to ``count`` bytes at ``offset`` and whether they reach the end of the file."""
        raise NotImplementedError

    def read_nowait(
        self, obj: ObjectId, offset: int, count: int
    ) -> tuple[bytes | memoryview | FileRange, bool, Attr] | None:
        """Like ``read`` plus the file's attributes, but only if it can be done without blocking (data in
        memory or the page cache); None means "ask ``read`` in a worker thread". Called on the event loop,
        so it must never wait for a disk or a lock held during I/O. The default never tries. The data may be a
        ``FileRange`` (``nfsd.filerange``): bytes still in a file that can never change, sent by sendfile(2)."""
        return None

    def write(self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow) -> WriteResult:
        raise NFSError(Status.NOTSUPP)

    def write_nowait(
        self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow
    ) -> tuple[WriteResult, Attr] | None:
        """Like ``write`` plus the file's attributes, but only if it cannot block (an UNSTABLE write into
        the page cache that needs no lock another thread may hold during I/O, no read, no sync); None means
        "ask ``write`` in the write pool". Called on the event loop. The default never tries."""
        return None

    def commit(self, obj: ObjectId, offset: int, count: int) -> None:
        """Make earlier UNSTABLE writes to ``obj`` durable."""

    def readlink(self, obj: ObjectId) -> str:
        raise NFSError(Status.INVAL)

    # --- namespace ------------------------------------------------------------------------------------
    def create(
        self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None, cred: Cred
    ) -> ObjectId:
        """CREATE. EXCLUSIVE mode passes an 8-byte ``verifier`` that must be stored with the file, so a
        retransmitted create with the same verifier succeeds and one with another fails with EXIST."""
        raise NFSError(Status.NOTSUPP)

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        raise NFSError(Status.NOTSUPP)

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        raise NFSError(Status.NOTSUPP)

    def remove(self, directory: ObjectId, name: str) -> None:
        raise NFSError(Status.NOTSUPP)

    def rmdir(self, directory: ObjectId, name: str) -> None:
        raise NFSError(Status.NOTSUPP)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        raise NFSError(Status.NOTSUPP)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        raise NFSError(Status.NOTSUPP)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        """Entries after ``cookie`` (0 = from the start, '.' and '..' included), at most about ``count``
        of them. A non-zero ``verifier`` that no longer matches raises NFSError(BAD_COOKIE)."""
        raise NotImplementedError

    # --- file system ----------------------------------------------------------------------------------
    def fsstat(self, obj: ObjectId) -> FsStat:
        raise NotImplementedError

    def fsinfo(self, obj: ObjectId) -> FsInfo:
        return FsInfo()

    def pathconf(self, obj: ObjectId) -> PathConf:
        return PathConf()

    def close(self) -> None:
        """Release resources (open files) when the server stops."""

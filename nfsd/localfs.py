"""A backend over a plain directory: the test export, and the home of files a hypervisor creates.

Objects are named by inode number. We remember where each inode lives as (parent inode, name), so renaming a
directory updates one entry, and a handle from before a restart is found again by searching the tree once
(``nfsd.treesearch``: bounded, so a client repeating a stale handle cannot make the server walk the tree per call).
Exclusive CREATE stores the client's verifier in the new file's atime/mtime (as Linux's knfsd does) until the
client's following SETATTR replaces them.

Confinement (STYLE.md rule 13): the export is a directory descriptor and nothing is ever opened by a host
path. Every use of a handle walks from that descriptor again (``nfsd.beneath``: no symlink followed on the way,
none at the end) to an ``O_PATH`` descriptor of the object and checks its inode, so a directory swapped for a
symlink after LOOKUP makes the old handle STALE instead of leading elsewhere. Changes go through ``*at`` calls
on the held directory descriptor that do not follow the final name, or through the object's own descriptor.
A symlink is data for READLINK: used as a directory it is NOTDIR, as a file INVAL; SETATTR on it changes
only the link (owner, times; a mode is ignored as Linux links have none) and never truncates. Only regular
files are opened for READ/WRITE/COMMIT, so a FIFO or device node in the export is INVAL, never opened.

Inode numbers are reused (ext4 gives a removed file's number to the next file at once), so a handle also
carries the object's generation (``nfsd.generation``) and every resolve, including a hit on a cached open
file, checks it: an old handle of a removed file is STALE, never the new file that got its number. Handles
with generation 0 (issued before generations, or where the file system gives none) are checked by inode only.
Depth is bounded by ``MAX_DEPTH`` names below the export: creating anything deeper is NAMETOOLONG.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

from nfsd.beneath import HAVE_OPENAT2, component, open_beneath
from nfsd.generation import generation, same
from nfsd.treesearch import Found, SearchLimits, TreeSearch
from nfsd.vfs import (
    Attr,
    Backend,
    CreateMode,
    Cred,
    FileType,
    FsStat,
    NFSError,
    ObjectId,
    ReadDirResult,
    SetAttr,
    StableHow,
    Status,
    WriteResult,
    readdir_page,
)

_TYPES = {
    stat.S_IFREG: FileType.REG,
    stat.S_IFDIR: FileType.DIR,
    stat.S_IFLNK: FileType.LNK,
    stat.S_IFBLK: FileType.BLK,
    stat.S_IFCHR: FileType.CHR,
    stat.S_IFSOCK: FileType.SOCK,
    stat.S_IFIFO: FileType.FIFO,
}
MAX_OPEN_FILES = 256
MAX_DEPTH = 1024  # names below the export; every resolve walks them, so deeper is refused at create time
_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)  # the remembered path no longer leads to a real object


def attr_from_stat(st: os.stat_result) -> Attr:
    return Attr(
        type=_TYPES.get(stat.S_IFMT(st.st_mode), FileType.REG),
        mode=stat.S_IMODE(st.st_mode),
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        used=st.st_blocks * 512,
        fileid=st.st_ino,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)),
        fsid=st.st_dev,
    )


class _Node:
    """One object held by descriptors: ``fd`` (O_PATH, the object itself, a symlink never followed) and
    ``dir_fd`` (O_PATH, the directory holding it as ``name``; the root is "." in itself)."""

    __slots__ = ("dir_fd", "name", "fd", "st")

    def __init__(self, dir_fd: int, name: str, fd: int, st: os.stat_result) -> None:
        self.dir_fd, self.name, self.fd, self.st = dir_fd, name, fd, st

    def __enter__(self) -> _Node:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        os.close(self.dir_fd)


class LocalFS(Backend):
    def __init__(
        self,
        root: Path | str,
        read_only: bool = False,
        use_openat2: bool = HAVE_OPENAT2,
        search_limits: SearchLimits = SearchLimits(),
    ) -> None:
        """``read_only``: files are opened read-only and the protocol layer refuses changes (ROFS) before they
        reach this backend. ``use_openat2`` False walks component by component (what kernels before 5.6 get);
        for tests."""
        self.base = Path(root).resolve()
        if not self.base.is_dir():
            raise NotADirectoryError(f"export directory {self.base} does not exist")
        self.read_only = read_only
        self._openat2 = use_openat2
        self._root_fd = os.open(self.base, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        # Never closed while the backend lives: a reused descriptor number would make walks start elsewhere.
        weakref.finalize(self, os.close, self._root_fd)
        st = os.fstat(self._root_fd)
        self._root = ObjectId(st.st_ino, generation(self._root_fd, st))
        self._dev = st.st_dev
        self._where: dict[int, tuple[int, str]] = {}
        self._lock = threading.RLock()
        self._fds: OrderedDict[int, tuple[int, int]] = OrderedDict()  # inode -> (open fd, its generation)
        self._is_root = os.geteuid() == 0
        self._search = TreeSearch(self._root_fd, self._dev, use_openat2, search_limits)
        # Counts our own namespace changes, so a search's merge knows whether its view is still the newest.
        self._changes = 0

    # --- where objects live ---------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self._root

    def _parts(self, ino: int) -> list[str]:
        """The names from the root down to ``ino``, as last remembered; an inode we do not know is searched for
        (bounded: ``nfsd.treesearch``), never while holding the map's lock."""
        parts, missing = self._chain(ino)
        if missing is None:
            return parts
        seen = self._changes
        self._search.refresh(lambda found: self._record(found, seen), ino)
        parts, missing = self._chain(ino)
        if missing is None:
            return parts
        raise NFSError(Status.STALE, f"object {ino} not found under {self.base}")

    def _chain(self, ino: int) -> tuple[list[str], int | None]:
        """(names from the root down to ``ino``, None), or (partial, the first inode whose place is unknown)."""
        parts: list[str] = []
        with self._lock:
            while ino != self._root.fileid:
                loc = self._where.get(ino)
                if loc is None:
                    return parts, ino
                parts.append(loc[1])
                ino = loc[0]
                if len(parts) > MAX_DEPTH:
                    raise NFSError(Status.STALE, "path loop")
        parts.reverse()
        return parts, None

    def _node(self, obj: ObjectId) -> _Node:
        """Walk to ``obj`` again from the export's descriptor and check it is still that inode."""
        parts = self._parts(obj.fileid)
        name = parts[-1] if parts else "."
        dir_fd = fd = -1
        try:
            dir_fd = open_beneath(self._root_fd, parts[:-1], os.O_PATH | os.O_DIRECTORY, self._openat2)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
            st = os.fstat(fd)
        except OSError as exc:
            for f in (fd, dir_fd):
                if f >= 0:
                    os.close(f)
            if exc.errno in _GONE:
                raise self._stale(obj, parts, "is gone from") from None
            raise
        if st.st_ino != obj.fileid or not self._same(obj, fd, st):
            os.close(fd)
            os.close(dir_fd)
            raise self._replaced(obj, parts, st)
        return _Node(dir_fd, name, fd, st)

    @staticmethod
    def _same(obj: ObjectId, fd: int, st: os.stat_result) -> bool:
        """Whether ``fd`` (O_PATH, inode ``obj.fileid``) is the very object ``obj`` was issued for."""
        return obj.generation == 0 or same(obj.generation, generation(fd, st))

    def _stat(self, obj: ObjectId) -> os.stat_result:
        """``_node``'s checks with one open instead of two: GETATTR is the most frequent call (post-op attributes,
        ESXi's heartbeat)."""
        parts = self._parts(obj.fileid)
        try:
            fd = open_beneath(self._root_fd, parts, os.O_PATH, self._openat2)
        except OSError as exc:
            if exc.errno in _GONE:
                raise self._stale(obj, parts, "is gone from") from None
            raise
        try:
            st = os.fstat(fd)
            ok = st.st_ino == obj.fileid and self._same(obj, fd, st)
        finally:
            os.close(fd)
        if not ok:
            raise self._replaced(obj, parts, st)
        return st

    def _replaced(self, obj: ObjectId, parts: list[str], st: os.stat_result) -> NFSError:
        """STALE for ``obj``, whose remembered place holds ``st``. Another inode there: our map is out of date.
        The same inode of another generation: the map is right (it is where the newer object lives) and ``obj``
        is gone for good; no search could find it, so none is started."""
        if st.st_ino != obj.fileid:
            return self._stale(obj, parts, "was replaced at")
        return NFSError(
            Status.STALE,
            f"object {obj.fileid} generation {obj.generation} was removed; its inode "
            f"number now names another object at {'/'.join(parts)!r}",
        )

    def _stale(self, obj: ObjectId, parts: list[str], what: str) -> NFSError:
        """The remembered path no longer leads to ``obj`` (removed, replaced, or a symlink on the way): the tree
        changed behind our back. Forget it, so the next use searches the real tree for it."""
        self._forget(obj.fileid)
        self._search.invalidate()
        return NFSError(Status.STALE, f"object {obj.fileid} {what} {'/'.join(parts)!r}")

    def _dir(self, obj: ObjectId) -> _Node:
        """Like ``_node`` but only a real directory will do: a symlink never acts as one."""
        node = self._node(obj)
        if not stat.S_ISDIR(node.st.st_mode):
            node.__exit__()
            raise NFSError(Status.NOTDIR, f"object {obj.fileid} is not a directory")
        return node

    def path(self, obj: ObjectId) -> str:
        """Where ``obj`` is, for messages and tests. Never open it: a host path would follow symlinks."""
        with self._node(obj):
            return os.path.join(self.base, *self._parts(obj.fileid))

    def _record(self, found: list[Found], changes_before: int) -> None:
        """Merge what a search saw into the map. A directory has one name, so where the walk saw it is where it
        is now, unless we changed the tree ourselves meanwhile: then what we know wins."""
        with self._lock:
            changed = self._changes != changes_before
            for f in found:
                if f.is_dir and not changed:
                    self._where[f.ino] = (f.parent, f.name)
                else:
                    self._where.setdefault(f.ino, (f.parent, f.name))  # a file may have several names

    def _remember(self, parent: ObjectId, name: str, st: os.stat_result, gen: int, change: bool = False) -> ObjectId:
        """Record where ``st`` (generation ``gen``) lives; ``change`` when we just made it there (create...)."""
        with self._lock:
            self._where[st.st_ino] = (parent.fileid, name)
            self._changes += change
        return ObjectId(st.st_ino, gen)

    def _entry(self, directory: ObjectId, dir_fd: int, name: str) -> ObjectId:
        """The object ``name`` in the directory ``dir_fd`` (``directory``), remembered, with its generation;
        FileNotFoundError if there is none."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            return self._remember(directory, name, st, generation(fd, st))
        finally:
            os.close(fd)

    def _check_depth(self, directory: ObjectId, name: str) -> None:
        """Refuse to make ``name`` in ``directory`` if it would lie deeper than ``MAX_DEPTH``: no handle could
        reach it."""
        if len(self._parts(directory.fileid)) >= MAX_DEPTH:
            raise NFSError(Status.NAMETOOLONG, f"{name!r} would be more than {MAX_DEPTH} levels below the export")

    def _forget(self, ino: int) -> None:
        with self._lock:
            self._where.pop(ino, None)
            self._changes += 1
            held = self._fds.pop(ino, None)
        if held is not None:
            os.close(held[0])

    @staticmethod
    def _regular(node: _Node, obj: ObjectId) -> None:
        if stat.S_ISDIR(node.st.st_mode):
            raise NFSError(Status.ISDIR, f"object {obj.fileid} is a directory")
        if not stat.S_ISREG(node.st.st_mode):
            kind = _TYPES.get(stat.S_IFMT(node.st.st_mode), FileType.REG).name
            raise NFSError(Status.INVAL, f"object {obj.fileid} is a {kind}, not a regular file")

    @staticmethod
    def _reopen(node: _Node, flags: int) -> int:
        """Open the regular file ``node`` holds for I/O: by its name in the held directory, without following a
        link and without blocking on a FIFO swapped in meanwhile, then checked to be the same inode."""
        fd = os.open(node.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=node.dir_fd)
        st = os.fstat(fd)
        if st.st_ino != node.st.st_ino or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NFSError(Status.STALE, f"object {node.st.st_ino} was replaced while being opened")
        return fd

    def _cached(self, obj: ObjectId) -> int | None:
        """The open descriptor held for ``obj``, if it is of that very object (the same generation). Caller
        holds the lock."""
        held = self._fds.get(obj.fileid)
        if held is None or not same(obj.generation, held[1]):
            return None
        return held[0]

    def _fd(self, obj: ObjectId) -> int:
        with self._lock:
            fd = self._cached(obj)
            if fd is not None:
                self._fds.move_to_end(obj.fileid)
        if fd is not None:
            try:
                if os.fstat(fd).st_nlink > 0:
                    return fd
            except OSError:
                pass  # closed meanwhile (evicted): open it again
            # Removed behind our back: never write into the orphan; resolving again answers STALE or the file.
            with self._lock:
                if self._fds.get(obj.fileid, (None,))[0] == fd:
                    del self._fds[obj.fileid]
                    os.close(fd)
        with self._node(obj) as node:  # checks the generation: a handle of a removed file is STALE here
            self._regular(node, obj)
            try:
                fd = self._reopen(node, os.O_RDONLY if self.read_only else os.O_RDWR)
            except PermissionError:
                fd = self._reopen(node, os.O_RDONLY)
            gen = generation(fd, node.st, opened=True)
        with self._lock:
            old = self._fds.get(obj.fileid)
            if old is not None and old[1] == gen:
                os.close(fd)
                return old[0]
            self._fds[obj.fileid] = (fd, gen)
            if old is not None:  # a removed file's descriptor: its inode number now names another file
                os.close(old[0])
            while len(self._fds) > MAX_OPEN_FILES:
                _, victim = self._fds.popitem(last=False)
                os.close(victim[0])
        return fd

    def _own(self, dir_fd: int, name: str, cred: Cred) -> None:
        if self._is_root:
            os.chown(name, cred.uid, cred.gid, dir_fd=dir_fd, follow_symlinks=False)

    # --- attributes -----------------------------------------------------------------------------------
    def getattr(self, obj: ObjectId) -> Attr:
        return attr_from_stat(self._stat(obj))

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        with self._node(obj) as node:
            is_link = stat.S_ISLNK(node.st.st_mode)
            if attrs.size is not None:
                self._regular(node, obj)
                fd = self._reopen(node, os.O_WRONLY)
                try:
                    os.ftruncate(fd, attrs.size)
                finally:
                    os.close(fd)
            if attrs.mode is not None and not is_link:
                # An O_PATH descriptor cannot fchmod; its /proc link reaches exactly the inode we hold.
                os.chmod(f"/proc/self/fd/{node.fd}", attrs.mode)
            if attrs.uid is not None or attrs.gid is not None:
                uid = -1 if attrs.uid is None else attrs.uid
                gid = -1 if attrs.gid is None else attrs.gid
                os.chown(node.name, uid, gid, dir_fd=node.dir_fd, follow_symlinks=False)
            if attrs.atime_ns is not None or attrs.mtime_ns is not None:
                now = time.time_ns()

                def pick(v: int | None, cur: int) -> int:
                    return cur if v is None else now if v == -1 else v

                ns = (pick(attrs.atime_ns, node.st.st_atime_ns), pick(attrs.mtime_ns, node.st.st_mtime_ns))
                os.utime(node.name, ns=ns, dir_fd=node.dir_fd, follow_symlinks=False)
            return attr_from_stat(os.fstat(node.fd))

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        with self._dir(directory) as d:
            try:
                return self._entry(directory, d.fd, component(name))
            except FileNotFoundError:
                raise NFSError(Status.NOENT, name) from None

    def parent(self, directory: ObjectId) -> ObjectId:
        if directory.fileid == self._root.fileid:
            return self._root
        with self._dir(directory) as node:  # '..' of a symlink or file is NOTDIR, as LOOKUP in it would be
            st = os.fstat(node.dir_fd)
            return ObjectId(st.st_ino, generation(node.dir_fd, st))

    # --- data -----------------------------------------------------------------------------------------
    def read(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool]:
        fd = self._fd(obj)
        data = os.pread(fd, count, offset)
        size = os.fstat(fd).st_size
        return data, offset + len(data) >= size

    def read_nowait(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool, Attr] | None:
        if not self._lock.acquire(blocking=False):
            return None
        try:
            fd = self._cached(obj)  # only files already open (opening may walk directories), and of this object
        finally:
            self._lock.release()
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if st.st_ino != obj.fileid or st.st_nlink == 0:
                return None  # removed or replaced: the slow path answers STALE
            want = max(0, min(count, st.st_size - offset))
            buf = bytearray(want)
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT) if want else 0
        except (BlockingIOError, OSError):
            return None  # not in the page cache (EAGAIN), or the fd was just closed: take the thread path
        if n < want:
            return None
        return buf, offset + n >= st.st_size, attr_from_stat(st)

    def write(self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow) -> WriteResult:
        fd = self._fd(obj)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        if stable == StableHow.FILE_SYNC:
            os.fsync(fd)
        elif stable == StableHow.DATA_SYNC:
            os.fdatasync(fd)
        return WriteResult(written, stable)

    def commit(self, obj: ObjectId, offset: int, count: int) -> None:
        os.fsync(self._fd(obj))

    def readlink(self, obj: ObjectId) -> str:
        with self._node(obj) as node:
            if not stat.S_ISLNK(node.st.st_mode):
                raise NFSError(Status.INVAL, f"object {obj.fileid} is not a symlink")
            return os.readlink("", dir_fd=node.fd)  # readlinkat on the link's own O_PATH descriptor

    # --- namespace ------------------------------------------------------------------------------------
    def create(
        self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None, cred: Cred
    ) -> ObjectId:
        if mode == CreateMode.EXCLUSIVE and (verifier is None or len(verifier) != 8):
            raise NFSError(Status.INVAL, f"exclusive create of {name!r} needs an 8-byte verifier")
        perm = 0o644 if attrs.mode is None else attrs.mode
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        self._check_depth(directory, name)
        with self._dir(directory) as d:
            name = component(name)
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, perm, dir_fd=d.fd)
            except FileExistsError:
                if mode == CreateMode.UNCHECKED:
                    fd = -1
                else:
                    st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
                    mine = mode == CreateMode.EXCLUSIVE and stat.S_ISREG(st.st_mode)
                    if mine and (int(st.st_atime), int(st.st_mtime)) == _verifier_times(verifier):
                        return self._entry(directory, d.fd, name)  # a retransmission of our own create
                    raise NFSError(Status.EXIST, name) from None
            if fd < 0:  # UNCHECKED on an existing name: keep the file (and its owner), apply the size
                try:
                    fd = os.open(name, flags, dir_fd=d.fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink, or a FIFO without a reader
                        raise NFSError(Status.EXIST, f"{name} exists and is not a regular file") from None
                    raise
                created = False
            else:
                created = True
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise NFSError(Status.EXIST, f"{name} exists and is not a regular file")
                if created and self._is_root:
                    os.fchown(fd, cred.uid, cred.gid)
                if mode == CreateMode.EXCLUSIVE:
                    os.utime(fd, _verifier_times(verifier))
                elif attrs.size is not None:
                    os.ftruncate(fd, attrs.size)
                st = os.fstat(fd)
                gen = generation(fd, st, opened=True)
            finally:
                os.close(fd)
        return self._remember(directory, name, st, gen, change=True)

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        self._check_depth(directory, name)
        with self._dir(directory) as d:
            os.mkdir(component(name), 0o755 if attrs.mode is None else attrs.mode, dir_fd=d.fd)
            self._own(d.fd, name, cred)
            obj = self._entry(directory, d.fd, name)
        with self._lock:
            self._changes += 1
        return obj

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        self._check_depth(directory, name)
        with self._dir(directory) as d:
            os.symlink(target, component(name), dir_fd=d.fd)
            self._own(d.fd, name, cred)
            obj = self._entry(directory, d.fd, name)
        with self._lock:
            self._changes += 1
        return obj

    def remove(self, directory: ObjectId, name: str) -> None:
        with self._dir(directory) as d:
            st = os.stat(component(name), dir_fd=d.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise NFSError(Status.ISDIR, name)
            os.unlink(name, dir_fd=d.fd)
        if st.st_nlink <= 1:
            self._forget(st.st_ino)
        else:
            with self._lock:
                if self._where.get(st.st_ino) == (directory.fileid, name):
                    del self._where[st.st_ino]
                    self._changes += 1
                    self._search.invalidate()  # it lives on under a name we do not know: let a search find it

    def rmdir(self, directory: ObjectId, name: str) -> None:
        with self._dir(directory) as d:
            st = os.stat(component(name), dir_fd=d.fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise NFSError(Status.NOTDIR, name)
            os.rmdir(name, dir_fd=d.fd)
        self._forget(st.st_ino)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        with self._dir(from_dir) as src, self._dir(to_dir) as dst:
            st = os.stat(component(from_name), dir_fd=src.fd, follow_symlinks=False)
            try:
                replaced = os.stat(component(to_name), dir_fd=dst.fd, follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
            os.rename(from_name, to_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        if replaced is not None and replaced.st_ino != st.st_ino and replaced.st_nlink <= 1:
            self._forget(replaced.st_ino)
        self._remember(to_dir, to_name, st, 0, change=True)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        self._check_depth(directory, name)
        with self._node(obj) as node, self._dir(directory) as d:
            if stat.S_ISDIR(node.st.st_mode):
                raise NFSError(Status.ISDIR, f"object {obj.fileid} is a directory")
            os.link(node.name, component(name), src_dir_fd=node.dir_fd, dst_dir_fd=d.fd, follow_symlinks=False)

    def names_in(self, directory: ObjectId) -> list[str]:
        """Every name in ``directory`` (without '.' and '..'), sorted, nothing stat'ed: what a READDIR page needs
        before it looks up only the names it returns."""
        with self._dir(directory) as d:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d.fd)
            try:
                return sorted(os.listdir(fd))
            finally:
                os.close(fd)

    def listing(self, directory: ObjectId) -> list[tuple[str, ObjectId]]:
        """Every name in ``directory`` (without '.' and '..') with its object, sorted by name."""
        with self._dir(directory) as d:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d.fd)
            try:
                out = []
                for name in sorted(os.listdir(fd)):
                    try:
                        out.append((name, self._entry(directory, fd, name)))
                    except FileNotFoundError:
                        continue  # removed since the listing
                return out
            finally:
                os.close(fd)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        with self._dir(directory) as d:
            if directory.fileid == self._root.fileid:
                parent = self._root
            else:
                pst = os.fstat(d.dir_fd)
                parent = ObjectId(pst.st_ino, generation(d.dir_fd, pst))
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d.fd)
            try:

                def resolve(_: int, name: str) -> ObjectId | None:
                    try:
                        return self._entry(directory, fd, name)
                    except FileNotFoundError:
                        return None  # removed since the listing

                names = sorted(os.listdir(fd))
                return readdir_page(directory, parent, names, cookie, verifier, count, resolve)
            finally:
                os.close(fd)

    # --- file system ----------------------------------------------------------------------------------
    def fsstat(self, obj: ObjectId) -> FsStat:
        with self._node(obj) as node:
            sv = os.statvfs(node.fd)
        return FsStat(
            total_bytes=sv.f_blocks * sv.f_frsize,
            free_bytes=sv.f_bfree * sv.f_frsize,
            avail_bytes=sv.f_bavail * sv.f_frsize,
            total_files=sv.f_files,
            free_files=sv.f_ffree,
            avail_files=sv.f_favail,
        )

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _verifier_times(verifier: bytes) -> tuple[int, int]:
    """The (atime, mtime) an exclusive create's 8-byte verifier is kept in."""
    return int.from_bytes(verifier[:4], "big"), int.from_bytes(verifier[4:], "big")

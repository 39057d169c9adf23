"""A backend over a plain directory: the test export, and the home of files a hypervisor creates.

Objects are named by inode number. We remember where each inode lives as (parent inode, name), so renaming a
directory updates one entry, and a handle from before a restart is found again by searching the tree once.
Exclusive CREATE stores the client's verifier in the new file's atime/mtime (as Linux's knfsd does) until the
client's following SETATTR replaces them.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from nfsd.vfs import (
    Attr,
    Backend,
    CreateMode,
    Cred,
    DirEntry,
    FileType,
    FsStat,
    NFSError,
    ObjectId,
    ReadDirResult,
    SetAttr,
    StableHow,
    Status,
    WriteResult,
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


class LocalFS(Backend):
    def __init__(self, root: Path | str, read_only: bool = False) -> None:
        self.base = Path(root).resolve()
        if not self.base.is_dir():
            raise NotADirectoryError(f"export directory {self.base} does not exist")
        self.read_only = read_only
        st = os.lstat(self.base)
        self._root = ObjectId(st.st_ino, 0)
        self._dev = st.st_dev
        self._where: dict[int, tuple[int, str]] = {}
        self._lock = threading.RLock()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._is_root = os.geteuid() == 0
        self._listings: dict[tuple[int, int], list[str]] = {}

    # --- where objects live ---------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self._root

    def path(self, obj: ObjectId) -> str:
        ino = obj.fileid
        if ino == self._root.fileid:
            return str(self.base)
        parts: list[str] = []
        with self._lock:
            seen = 0
            while ino != self._root.fileid:
                loc = self._where.get(ino)
                if loc is None:
                    loc = self._search(ino)
                parts.append(loc[1])
                ino = loc[0]
                seen += 1
                if seen > 4096:
                    raise NFSError(Status.STALE, "path loop")
        path = os.path.join(self.base, *reversed(parts))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(obj.fileid)
            raise NFSError(Status.STALE, f"object {obj.fileid} is gone") from None
        if st.st_ino != obj.fileid:
            self._forget(obj.fileid)
            raise NFSError(Status.STALE, f"object {obj.fileid} was replaced")
        return path

    def _search(self, ino: int) -> tuple[int, str]:
        """Find an inode we have not seen since the start (a handle from before a restart)."""
        for dirpath, dirnames, filenames in os.walk(self.base):
            dino = os.lstat(dirpath).st_ino
            for name in dirnames + filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if st.st_dev != self._dev:
                    continue
                self._where.setdefault(st.st_ino, (dino, name))
                if st.st_ino == ino:
                    return dino, name
        raise NFSError(Status.STALE, f"object {ino} not found under {self.base}")

    def _remember(self, parent: ObjectId, name: str, st: os.stat_result) -> ObjectId:
        with self._lock:
            self._where[st.st_ino] = (parent.fileid, name)
        return ObjectId(st.st_ino, 0)

    def _forget(self, ino: int) -> None:
        with self._lock:
            self._where.pop(ino, None)
            fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def _child(self, directory: ObjectId, name: str) -> str:
        d = self.path(directory)
        if not os.path.isdir(d):
            raise NFSError(Status.NOTDIR)
        return os.path.join(d, name)

    def _fd(self, obj: ObjectId) -> int:
        with self._lock:
            fd = self._fds.get(obj.fileid)
            if fd is not None:
                self._fds.move_to_end(obj.fileid)
                return fd
        path = self.path(obj)
        if os.path.isdir(path):
            raise NFSError(Status.ISDIR)
        try:
            fd = os.open(path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_NOFOLLOW)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NFSError(Status.INVAL, "is a symlink") from None
            raise
        with self._lock:
            old = self._fds.get(obj.fileid)
            if old is not None:
                os.close(fd)
                return old
            self._fds[obj.fileid] = fd
            while len(self._fds) > MAX_OPEN_FILES:
                _, victim = self._fds.popitem(last=False)
                os.close(victim)
        return fd

    def _own(self, path: str, cred: Cred) -> None:
        if self._is_root:
            os.lchown(path, cred.uid, cred.gid)

    # --- attributes -----------------------------------------------------------------------------------
    def getattr(self, obj: ObjectId) -> Attr:
        return attr_from_stat(os.lstat(self.path(obj)))

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self.path(obj)
        is_link = os.path.islink(path)
        if attrs.size is not None:
            if os.path.isdir(path):
                raise NFSError(Status.ISDIR)
            os.truncate(path, attrs.size)
        if attrs.mode is not None and not is_link:
            os.chmod(path, attrs.mode)
        if attrs.uid is not None or attrs.gid is not None:
            os.lchown(path, -1 if attrs.uid is None else attrs.uid, -1 if attrs.gid is None else attrs.gid)
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            st = os.lstat(path)
            now = time.time_ns()

            def pick(v: int | None, cur: int) -> int:
                return cur if v is None else now if v == -1 else v

            os.utime(path, ns=(pick(attrs.atime_ns, st.st_atime_ns), pick(attrs.mtime_ns, st.st_mtime_ns)),
                     follow_symlinks=False)  # fmt: skip
        return self.getattr(obj)

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        path = self._child(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NFSError(Status.NOENT, name) from None
        return self._remember(directory, name, st)

    def parent(self, directory: ObjectId) -> ObjectId:
        if directory.fileid == self._root.fileid:
            return self._root
        path = self.path(directory)
        return ObjectId(os.lstat(os.path.dirname(path)).st_ino, 0)

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
            fd = self._fds.get(obj.fileid)  # only files already open: opening may walk directories
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
        if self.read_only:
            raise NFSError(Status.ROFS)
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
        path = self.path(obj)
        if not os.path.islink(path):
            raise NFSError(Status.INVAL, "not a symlink")
        return os.readlink(path)

    # --- namespace ------------------------------------------------------------------------------------
    def create(
        self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None, cred: Cred
    ) -> ObjectId:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self._child(directory, name)
        perm = 0o644 if attrs.mode is None else attrs.mode
        if mode == CreateMode.EXCLUSIVE:
            assert verifier is not None and len(verifier) == 8
            atime, mtime = int.from_bytes(verifier[:4], "big"), int.from_bytes(verifier[4:], "big")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perm)
            except FileExistsError:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and (int(st.st_atime), int(st.st_mtime)) == (atime, mtime):
                    return self._remember(directory, name, st)  # a retransmission of our own create
                raise NFSError(Status.EXIST, name) from None
            os.close(fd)
            self._own(path, cred)
            os.utime(path, (atime, mtime))
        else:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if mode == CreateMode.GUARDED else 0)
            try:
                fd = os.open(path, flags | os.O_NOFOLLOW, perm)
            except FileExistsError:
                raise NFSError(Status.EXIST, name) from None
            os.close(fd)
            existed_size = attrs.size
            self._own(path, cred)
            if existed_size is not None:
                os.truncate(path, existed_size)
        return self._remember(directory, name, os.lstat(path))

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self._child(directory, name)
        os.mkdir(path, 0o755 if attrs.mode is None else attrs.mode)
        self._own(path, cred)
        return self._remember(directory, name, os.lstat(path))

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self._child(directory, name)
        os.symlink(target, path)
        self._own(path, cred)
        return self._remember(directory, name, os.lstat(path))

    def remove(self, directory: ObjectId, name: str) -> None:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self._child(directory, name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise NFSError(Status.ISDIR, name)
        os.unlink(path)
        if st.st_nlink <= 1:
            self._forget(st.st_ino)
        else:
            with self._lock:
                if self._where.get(st.st_ino) == (directory.fileid, name):
                    del self._where[st.st_ino]

    def rmdir(self, directory: ObjectId, name: str) -> None:
        if self.read_only:
            raise NFSError(Status.ROFS)
        path = self._child(directory, name)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NFSError(Status.NOTDIR, name)
        os.rmdir(path)
        self._forget(st.st_ino)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        if self.read_only:
            raise NFSError(Status.ROFS)
        src = self._child(from_dir, from_name)
        dst = self._child(to_dir, to_name)
        st = os.lstat(src)
        try:
            replaced = os.lstat(dst)
        except FileNotFoundError:
            replaced = None
        os.rename(src, dst)
        if replaced is not None and replaced.st_ino != st.st_ino and replaced.st_nlink <= 1:
            self._forget(replaced.st_ino)
        with self._lock:
            self._where[st.st_ino] = (to_dir.fileid, to_name)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        if self.read_only:
            raise NFSError(Status.ROFS)
        os.link(self.path(obj), self._child(directory, name), follow_symlinks=False)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        path = self.path(directory)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NFSError(Status.NOTDIR)
        current = st.st_mtime_ns & 0xFFFFFFFFFFFFFFFF
        if cookie and verifier and verifier != current:
            raise NFSError(Status.BAD_COOKIE, "directory changed since the listing began")
        names = sorted(os.listdir(path))
        entries: list[DirEntry] = []
        # cookies: 1 = '.', 2 = '..', 3 + i = names[i]
        if cookie < 1:
            entries.append(DirEntry(".", directory, 1))
        if cookie < 2:
            entries.append(DirEntry("..", self.parent(directory), 2))
        start = max(0, cookie - 2)
        budget = max(count // 16, 16)  # no more entries than the reply could possibly hold
        for i in range(start, len(names)):
            if len(entries) >= budget:
                return ReadDirResult(entries, eof=False, verifier=current)
            try:
                cst = os.lstat(os.path.join(path, names[i]))
            except FileNotFoundError:
                continue
            entries.append(DirEntry(names[i], self._remember(directory, names[i], cst), 3 + i))
        return ReadDirResult(entries, eof=True, verifier=current)

    # --- file system ----------------------------------------------------------------------------------
    def fsstat(self, obj: ObjectId) -> FsStat:
        sv = os.statvfs(self.path(obj))
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
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

"""One published VM folder: real files in the session's cache directory (the .vmx, the descriptors and
whatever the hypervisor creates: .lck-*, .vswp, vmware.log, .nvram, redo logs) with the -flat.vmdk extents
laid over them as virtual files whose reads come from the backup and whose writes go to the write cache.

It is an ``nfsd.vfs.Backend`` over folder-local ids (``appliance.datastore.layer``): a real file's inode
number, or EXTENT_BIT | disk index for an extent. Its files/ directory is a LocalFS it only calls publicly.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.atomicfile import write_atomic
from appliance.cache.overlay import WriteCache
from appliance.datastore.layer import TAG_BIT, FilesLayer, page_by_lookup, real
from nfsd.localfs import LocalFS
from nfsd.vfs import (
    Attr,
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
)

EXTENT_BIT = TAG_BIT


@dataclass
class Extent:
    index: int
    key: str  # the name it was published under
    cache: WriteCache
    mtime_ns: int
    ctime_ns: int


class SessionFolder(FilesLayer):
    def __init__(self, directory: Path, extents: dict[str, WriteCache]) -> None:
        """``directory`` holds files/ (the real files) and names.json (current names of the extents)."""
        self.directory = Path(directory)
        self.files = LocalFS(self.directory / "files")
        now = time.time_ns()
        self.extents = [Extent(i, key, cache, now, now) for i, (key, cache) in enumerate(extents.items())]
        self._names_path = self.directory / "names.json"
        self._lock = threading.RLock()
        try:
            self.names: dict[str, str | None] = json.loads(self._names_path.read_text())
        except FileNotFoundError:
            self.names = {e.key: e.key for e in self.extents}
            self._save_names()

    def _save_names(self) -> None:
        write_atomic(self._names_path, json.dumps(self.names))

    # --- name resolution ------------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self.files.root()

    def is_root(self, obj: ObjectId) -> bool:
        return obj.fileid == self.files.root().fileid

    def _extent(self, obj: ObjectId) -> Extent | None:
        if obj.fileid & EXTENT_BIT:
            i = obj.fileid & ~EXTENT_BIT
            if i >= len(self.extents) or self.names.get(self.extents[i].key) is None:
                raise NFSError(Status.STALE, "extent was removed")
            return self.extents[i]
        return None

    def _visible(self) -> dict[str, Extent]:
        return {self.names[e.key]: e for e in self.extents if self.names.get(e.key)}

    # --- the Backend methods, on folder-local ids -----------------------------------------------------
    def getattr(self, obj: ObjectId) -> Attr:
        ext = self._extent(obj)
        if ext is None:
            return self.files.getattr(obj)
        return self._extent_attr(ext, obj.fileid)

    @staticmethod
    def _extent_attr(ext: Extent, fileid: int) -> Attr:
        size = ext.cache.size
        return Attr(
            type=FileType.REG,
            mode=0o600,
            nlink=1,
            uid=0,
            gid=0,
            size=size,
            used=min(size, ext.cache.usage_bytes()) if size else 0,
            fileid=fileid,
            atime_ns=ext.mtime_ns,
            mtime_ns=ext.mtime_ns,
            ctime_ns=ext.ctime_ns,
        )

    def getattr_nowait(self, obj: ObjectId) -> Attr | None:
        """An extent's attributes live in memory; a real file's need a walk of its folder."""
        return self.getattr(obj) if obj.fileid & EXTENT_BIT else None

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        ext = self._extent(obj)
        if ext is None:
            return self.files.setattr(obj, attrs, cred)
        if attrs.size is not None and attrs.size != ext.cache.size:
            ext.cache.truncate(attrs.size)
        now = time.time_ns()
        if attrs.mtime_ns is not None:
            ext.mtime_ns = now if attrs.mtime_ns == -1 else attrs.mtime_ns
        ext.ctime_ns = now
        return self.getattr(obj)

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        if self.is_root(directory):
            ext = self._visible().get(name)
            if ext is not None:
                return ObjectId(EXTENT_BIT | ext.index, 0)
        return real(self.files.lookup(directory, name))

    def read(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool]:
        ext = self._extent(obj)
        if ext is None:
            return self.files.read(obj, offset, count)
        data = ext.cache.read(offset, count)
        return data, offset + len(data) >= ext.cache.size

    def read_nowait(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool, Attr] | None:
        ext = self._extent(obj)
        if ext is None:
            return self.files.read_nowait(obj, offset, count)
        data = ext.cache.read_nowait(offset, count)
        if data is None:
            return None
        return data, offset + len(data) >= ext.cache.size, self._extent_attr(ext, obj.fileid)

    def write(self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow) -> WriteResult:
        ext = self._extent(obj)
        if ext is None:
            return self.files.write(obj, offset, data, stable)
        n = ext.cache.write(offset, data, sync=stable != StableHow.UNSTABLE)
        ext.mtime_ns = ext.ctime_ns = time.time_ns()
        return WriteResult(n, StableHow.FILE_SYNC if stable != StableHow.UNSTABLE else StableHow.UNSTABLE)

    def write_nowait(
        self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow
    ) -> tuple[WriteResult, Attr] | None:
        ext = self._extent(obj)
        if ext is None or stable != StableHow.UNSTABLE:
            return None
        n = ext.cache.write_nowait(offset, data)
        if n is None:
            return None
        ext.mtime_ns = ext.ctime_ns = time.time_ns()
        return WriteResult(n, StableHow.UNSTABLE), self._extent_attr(ext, obj.fileid)

    def commit(self, obj: ObjectId, offset: int, count: int) -> None:
        ext = self._extent(obj)
        if ext is None:
            self.files.commit(obj, offset, count)
        else:
            ext.cache.commit()

    def _no_clash(self, directory: ObjectId, name: str) -> None:
        if self.is_root(directory) and name in self._visible():
            raise NFSError(Status.EXIST, name)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        if self._extent(obj) is not None:
            raise NFSError(Status.NOTSUPP, "the published extent cannot be hard-linked")
        self._no_clash(directory, name)
        self.files.link(obj, directory, name)

    def remove(self, directory: ObjectId, name: str) -> None:
        with self._lock:
            if self.is_root(directory):
                ext = self._visible().get(name)
                if ext is not None:
                    # Hide it in this session (a finished storage migration deletes the source files).
                    self.names[ext.key] = None
                    self._save_names()
                    return
            self.files.remove(directory, name)

    def rmdir(self, directory: ObjectId, name: str) -> None:
        self.files.rmdir(directory, name)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        with self._lock:
            visible = self._visible()
            src = visible.get(from_name) if self.is_root(from_dir) else None
            if src is not None:
                if not self.is_root(to_dir):
                    raise NFSError(Status.XDEV, "extents stay at the top of their folder")
                target = visible.get(to_name)
                if target is not None and target is not src:
                    self.names[target.key] = None
                self.files.remove(to_dir, to_name) if self._exists(to_dir, to_name) else None
                self.names[src.key] = to_name
                self._save_names()
                return
            if self.is_root(to_dir) and to_name in visible:
                self.names[visible[to_name].key] = None  # a real file replaces the extent's name
                self._save_names()
            self.files.rename(from_dir, from_name, to_dir, to_name)

    def _exists(self, directory: ObjectId, name: str) -> bool:
        try:
            self.files.lookup(directory, name)
            return True
        except NFSError:
            return False

    def names_in(self, directory: ObjectId) -> list[str]:
        """All names in ``directory`` (without '.' and '..'), sorted, none looked up (``lookup`` gives each)."""
        names = set(self.files.names_in(directory))  # by descriptor: a symlink handle is NOTDIR
        if self.is_root(directory):
            names.update(self._visible())
        return sorted(names)

    def listing(self, directory: ObjectId) -> list[tuple[str, ObjectId]]:
        """All names in ``directory`` (without '.' and '..'), sorted."""
        entries: dict[str, ObjectId] = {}
        for name, obj in self.files.listing(directory):  # by descriptor: a symlink handle is NOTDIR
            entries[name] = real(obj)
        if self.is_root(directory):
            for name, ext in self._visible().items():
                entries[name] = ObjectId(EXTENT_BIT | ext.index, 0)
        return sorted(entries.items())

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        return page_by_lookup(self, directory, self.names_in(directory), cookie, verifier, count)

    def readlink(self, obj: ObjectId) -> str:
        if self._extent(obj) is not None:
            raise NFSError(Status.INVAL)
        return self.files.readlink(obj)

    def parent(self, obj: ObjectId) -> ObjectId:
        return self.files.parent(obj)

    def fsstat(self, obj: ObjectId) -> FsStat:
        return self.files.fsstat(self.files.root())

    def flush(self) -> None:
        for e in self.extents:
            e.cache.commit()

    def close(self) -> None:
        for e in self.extents:
            e.cache.close()
        self.files.close()

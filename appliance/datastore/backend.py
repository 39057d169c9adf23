"""The NFS backend of the datastore: a root listing the published VM folders, each a SessionFolder.

It stacks, it does not branch: the root is a directory of real files (hypervisors keep things like
.vSphere-HA there) with the session folders laid over it, and every folder is its own stack of real files
and backup-backed extents. File ids carry the folder's slot in their top 20 bits, so they are unique across
folders and stable across restarts (slots are never reused).
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

from appliance.datastore.folder import LOCAL_MASK, SessionFolder
from nfsd.localfs import LocalFS
from nfsd.vfs import (
    Attr,
    Backend,
    CreateMode,
    Cred,
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

SLOT_SHIFT = 44


class DatastoreBackend(Backend):
    def __init__(self, root_dir: Path) -> None:
        root_dir.mkdir(parents=True, exist_ok=True)
        self.rootfs = LocalFS(root_dir)
        self._folders: dict[int, tuple[str, SessionFolder]] = {}
        self._lock = threading.RLock()
        self.fsid = zlib.crc32(str(root_dir).encode())

    # --- publishing -----------------------------------------------------------------------------------
    def add_folder(self, slot: int, name: str, folder: SessionFolder) -> None:
        if not 0 < slot < (1 << 20):
            raise ValueError(f"slot {slot} out of range")
        with self._lock:
            if any(n == name for n, _ in self._folders.values()):
                raise ValueError(f"a folder named {name} is already published")
            self._folders[slot] = (name, folder)

    def remove_folder(self, slot: int) -> SessionFolder | None:
        with self._lock:
            entry = self._folders.pop(slot, None)
        return entry[1] if entry else None

    def folder_names(self) -> list[str]:
        return sorted(n for n, _ in self._folders.values())

    # --- id routing -----------------------------------------------------------------------------------
    def _route(self, obj: ObjectId) -> tuple[int, SessionFolder | None, ObjectId]:
        slot = obj.fileid >> SLOT_SHIFT
        local = ObjectId(obj.fileid & LOCAL_MASK, obj.generation)
        if slot == 0:
            return 0, None, local
        entry = self._folders.get(slot)
        if entry is None:
            raise NFSError(Status.STALE, f"folder {slot} is no longer published")
        return slot, entry[1], local

    @staticmethod
    def _global(slot: int, local: ObjectId) -> ObjectId:
        if local.fileid > LOCAL_MASK:
            raise NFSError(Status.SERVERFAULT, f"file id {local.fileid} too large")
        return ObjectId((slot << SLOT_SHIFT) | local.fileid, local.generation)

    def _fix(self, slot: int, attr: Attr) -> Attr:
        attr.fileid = (slot << SLOT_SHIFT) | attr.fileid
        attr.fsid = self.fsid
        return attr

    def _folder_by_name(self, name: str) -> tuple[int, SessionFolder] | None:
        for slot, (n, folder) in self._folders.items():
            if n == name:
                return slot, folder
        return None

    # --- Backend --------------------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self.rootfs.root()

    def getattr(self, obj: ObjectId) -> Attr:
        slot, folder, local = self._route(obj)
        if folder is None:
            return self._fix(0, self.rootfs.getattr(local))
        return self._fix(slot, folder.getattr(local))

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        slot, folder, local = self._route(obj)
        if folder is None:
            return self._fix(0, self.rootfs.setattr(local, attrs, cred))
        return self._fix(slot, folder.setattr(local, attrs, cred))

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        slot, folder, local = self._route(directory)
        if folder is None:
            if local.fileid == self.rootfs.root().fileid:
                hit = self._folder_by_name(name)
                if hit is not None:
                    return self._global(hit[0], hit[1].root())
            return self.rootfs.lookup(local, name)
        return self._global(slot, folder.lookup(local, name))

    def parent(self, directory: ObjectId) -> ObjectId:
        slot, folder, local = self._route(directory)
        if folder is None:
            return self.rootfs.parent(local)
        if folder.is_root(local):
            return self.root()
        return self._global(slot, folder.parent(local))

    def read(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool]:
        slot, folder, local = self._route(obj)
        return (self.rootfs if folder is None else folder).read(local, offset, count)

    def read_nowait(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes, bool, Attr] | None:
        slot, folder, local = self._route(obj)
        hit = (self.rootfs if folder is None else folder).read_nowait(local, offset, count)
        if hit is None:
            return None
        return hit[0], hit[1], self._fix(slot, hit[2])

    def write(self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow) -> WriteResult:
        slot, folder, local = self._route(obj)
        return (self.rootfs if folder is None else folder).write(local, offset, data, stable)

    def commit(self, obj: ObjectId, offset: int, count: int) -> None:
        slot, folder, local = self._route(obj)
        (self.rootfs if folder is None else folder).commit(local, offset, count)

    def readlink(self, obj: ObjectId) -> str:
        slot, folder, local = self._route(obj)
        return (self.rootfs if folder is None else folder).readlink(local)

    def _in_root_clash(self, local: ObjectId, name: str) -> None:
        if local.fileid == self.rootfs.root().fileid and self._folder_by_name(name) is not None:
            raise NFSError(Status.EXIST, name)

    def create(self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None,
               cred: Cred) -> ObjectId:  # fmt: skip
        slot, folder, local = self._route(directory)
        if folder is None:
            self._in_root_clash(local, name)
            return self.rootfs.create(local, name, mode, attrs, verifier, cred)
        return self._global(slot, folder.create(local, name, mode, attrs, verifier, cred))

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        slot, folder, local = self._route(directory)
        if folder is None:
            self._in_root_clash(local, name)
            return self.rootfs.mkdir(local, name, attrs, cred)
        return self._global(slot, folder.mkdir(local, name, attrs, cred))

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        slot, folder, local = self._route(directory)
        if folder is None:
            self._in_root_clash(local, name)
            return self.rootfs.symlink(local, name, target, attrs, cred)
        return self._global(slot, folder.symlink(local, name, target, attrs, cred))

    def remove(self, directory: ObjectId, name: str) -> None:
        slot, folder, local = self._route(directory)
        if folder is None:
            if local.fileid == self.rootfs.root().fileid and self._folder_by_name(name):
                raise NFSError(Status.ISDIR, name)
            return self.rootfs.remove(local, name)
        folder.remove(local, name)

    def rmdir(self, directory: ObjectId, name: str) -> None:
        slot, folder, local = self._route(directory)
        if folder is None:
            if local.fileid == self.rootfs.root().fileid and self._folder_by_name(name):
                raise NFSError(Status.ACCES, "stop the session to remove its folder")
            return self.rootfs.rmdir(local, name)
        folder.rmdir(local, name)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        s1, f1, l1 = self._route(from_dir)
        s2, f2, l2 = self._route(to_dir)
        if s1 != s2:
            raise NFSError(Status.XDEV, "files cannot move between published folders")
        if f1 is None:
            self._in_root_clash(l1, from_name)
            self._in_root_clash(l2, to_name)
            return self.rootfs.rename(l1, from_name, l2, to_name)
        f1.rename(l1, from_name, l2, to_name)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        s1, f1, l1 = self._route(obj)
        s2, f2, l2 = self._route(directory)
        if s1 != s2:
            raise NFSError(Status.XDEV)
        if f1 is None:
            return self.rootfs.link(l1, l2, name)
        f1.link(l1, l2, name)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        slot, folder, local = self._route(directory)
        if folder is None:
            names = set(self.rootfs.names_in(local))  # by descriptor: a symlink handle is NOTDIR, never followed
            if local.fileid == self.rootfs.root().fileid:
                names.update(n for n, _ in self._folders.values())  # a published folder hides a real entry
            names = sorted(names)
        else:
            names = folder.names_in(local)

        def resolve(_: int, name: str) -> ObjectId | None:  # only the page's names are looked up
            try:
                return self.lookup(directory, name)
            except NFSError as exc:
                if exc.status == Status.NOENT:
                    return None  # removed since the listing
                raise

        return readdir_page(directory, self.parent(directory), names, cookie, verifier, count, resolve)

    def fsstat(self, obj: ObjectId) -> FsStat:
        slot, folder, local = self._route(obj)
        return self.rootfs.fsstat(self.rootfs.root()) if folder is None else folder.fsstat()

    def close(self) -> None:
        self.rootfs.close()
        for _, f in self._folders.values():
            f.close()

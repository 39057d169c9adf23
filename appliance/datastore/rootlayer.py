"""The datastore's top folder: its own real files (hypervisors keep things like .vSphere-HA there) with the
published session folders laid over them as junctions. A published name hides a real entry of that name and
can be neither created, linked, renamed nor removed over: a folder goes away only when its session stops.

Local ids: a real file's inode, or ``TAG_BIT | slot`` for the junction into the folder published in ``slot``
(``DatastoreBackend`` turns it into that folder's root; it never comes back down as an id of this layer).
"""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.datastore.layer import TAG_BIT, FilesLayer, page_by_lookup, real
from nfsd.localfs import LocalFS
from nfsd.vfs import FsStat, NFSError, ObjectId, ReadDirResult, Status


class RootLayer(FilesLayer):
    def __init__(self, directory: Path) -> None:
        self.files = LocalFS(directory)
        self._mounts: dict[str, int] = {}  # published name -> slot
        self._lock = threading.Lock()
        # Objects of this layer are all real files: the attribute and data calls go straight to LocalFS,
        # without a Python frame of ours on the READ/WRITE path.
        self.getattr = self.files.getattr
        self.setattr = self.files.setattr
        self.read = self.files.read
        self.read_nowait = self.files.read_nowait
        self.write = self.files.write
        self.commit = self.files.commit
        self.readlink = self.files.readlink
        self.parent = self.files.parent

    # --- the junctions --------------------------------------------------------------------------------
    def mount(self, name: str, slot: int) -> None:
        with self._lock:
            if name in self._mounts:
                raise ValueError(f"a folder named {name} is already published")
            self._mounts[name] = slot

    def unmount(self, slot: int) -> str | None:
        with self._lock:
            for name, s in self._mounts.items():
                if s == slot:
                    del self._mounts[name]
                    return name
        return None

    def mounted(self) -> list[str]:
        with self._lock:
            return sorted(self._mounts)

    def junction(self, obj: ObjectId) -> int | None:
        return obj.fileid & ~TAG_BIT if obj.fileid & TAG_BIT else None

    def _published(self, directory: ObjectId, name: str) -> bool:
        return directory.fileid == self.files.root().fileid and name in self._mounts

    def _no_clash(self, directory: ObjectId, name: str) -> None:
        if self._published(directory, name):
            raise NFSError(Status.EXIST, f"{name} is a published folder")

    # --- Backend --------------------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self.files.root()

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        slot = self._mounts.get(name) if directory.fileid == self.files.root().fileid else None
        if slot is not None:
            return ObjectId(TAG_BIT | slot, 0)
        return real(self.files.lookup(directory, name))

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        self._no_clash(directory, name)
        self.files.link(obj, directory, name)

    def remove(self, directory: ObjectId, name: str) -> None:
        if self._published(directory, name):
            raise NFSError(Status.ISDIR, name)
        self.files.remove(directory, name)

    def rmdir(self, directory: ObjectId, name: str) -> None:
        if self._published(directory, name):
            raise NFSError(Status.ACCES, f"stop the session to remove its folder {name}")
        self.files.rmdir(directory, name)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        self._no_clash(from_dir, from_name)
        self._no_clash(to_dir, to_name)
        self.files.rename(from_dir, from_name, to_dir, to_name)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        names = set(self.files.names_in(directory))  # by descriptor: a symlink handle is NOTDIR, never followed
        if directory.fileid == self.files.root().fileid:
            with self._lock:
                names.update(self._mounts)  # a published folder hides a real entry
        return page_by_lookup(self, directory, sorted(names), cookie, verifier, count)

    def fsstat(self, obj: ObjectId) -> FsStat:
        return self.files.fsstat(self.files.root())

    def close(self) -> None:
        self.files.close()

"""The NFS backend of the datastore: a stack of layers, one per slot, and nothing else.

Slot 0 is the ``RootLayer`` (the datastore's top folder: its own real files with the published folders laid
over them as junctions); every other slot holds a published ``SessionFolder``. Each layer is an
``nfsd.vfs.Backend`` over local ids; this class only maps a file id's slot (its top 20 bits) to its layer and
translates ids on the way down and up, as nfs-ganesha's stacked FSALs forward to the layer below. Two rules
join the layers: a junction id from a layer's LOOKUP/READDIR becomes the root of the slot it names, and the
top of a session folder has the datastore's root as its '..'. Ids are unique across folders and stable across
restarts (slots are never reused); nothing moves or links between slots (XDEV).
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

from appliance.datastore.folder import SessionFolder
from appliance.datastore.layer import LOCAL_BITS, LOCAL_MASK, Layer
from appliance.datastore.rootlayer import RootLayer
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
)

SLOT_SHIFT = LOCAL_BITS
ROOT_SLOT = 0
MAX_SLOT = (1 << 20) - 1


class DatastoreBackend(Backend):
    def __init__(self, root_dir: Path) -> None:
        root_dir.mkdir(parents=True, exist_ok=True)
        self.top = RootLayer(root_dir)
        self._layers: dict[int, Layer] = {ROOT_SLOT: self.top}
        self._lock = threading.RLock()
        self.fsid = zlib.crc32(str(root_dir).encode())

    @property
    def rootfs(self) -> LocalFS:
        """The real files of the datastore's top folder."""
        return self.top.files

    # --- publishing -----------------------------------------------------------------------------------
    def add_folder(self, slot: int, name: str, folder: SessionFolder) -> None:
        if not ROOT_SLOT < slot <= MAX_SLOT:
            raise ValueError(f"slot {slot} out of range 1..{MAX_SLOT}")
        with self._lock:
            if slot in self._layers:
                raise ValueError(f"slot {slot} already holds a published folder")
            self._layers[slot] = folder  # before the junction, so whoever finds the name finds the folder
            try:
                self.top.mount(name, slot)
            except ValueError:
                del self._layers[slot]
                raise

    def remove_folder(self, slot: int) -> SessionFolder | None:
        if slot == ROOT_SLOT:
            return None
        with self._lock:
            self.top.unmount(slot)
            layer = self._layers.pop(slot, None)
        return layer if isinstance(layer, SessionFolder) else None

    def folder_names(self) -> list[str]:
        return self.top.mounted()

    # --- id translation -------------------------------------------------------------------------------
    def _route(self, obj: ObjectId) -> tuple[int, Layer, ObjectId]:
        slot = obj.fileid >> SLOT_SHIFT
        layer = self._layers.get(slot)
        if layer is None:
            raise NFSError(Status.STALE, f"folder {slot} is no longer published")
        return slot, layer, ObjectId(obj.fileid & LOCAL_MASK, obj.generation)

    @staticmethod
    def _global(slot: int, local: ObjectId) -> ObjectId:
        if local.fileid > LOCAL_MASK:
            raise NFSError(Status.SERVERFAULT, f"file id {local.fileid} too large")
        return ObjectId((slot << SLOT_SHIFT) | local.fileid, local.generation)

    def _up(self, slot: int, layer: Layer, local: ObjectId) -> ObjectId:
        """A local id a layer's LOOKUP/READDIR gave, as a datastore id: a junction is its folder's root."""
        target = layer.junction(local)
        if target is None:
            return self._global(slot, local)
        folder = self._layers.get(target)
        if folder is None:
            raise NFSError(Status.NOENT, f"folder {target} was unpublished meanwhile")
        return self._global(target, folder.root())

    def _fix(self, slot: int, attr: Attr) -> Attr:
        attr.fileid = (slot << SLOT_SHIFT) | attr.fileid
        attr.fsid = self.fsid
        return attr

    @staticmethod
    def _same_slot(a: int, b: int) -> None:
        if a != b:
            raise NFSError(Status.XDEV, "files cannot move or link between published folders")

    # --- Backend --------------------------------------------------------------------------------------
    def root(self) -> ObjectId:
        return self._global(ROOT_SLOT, self.top.root())

    def getattr(self, obj: ObjectId) -> Attr:
        slot, layer, local = self._route(obj)
        return self._fix(slot, layer.getattr(local))

    def getattr_nowait(self, obj: ObjectId) -> Attr | None:
        slot, layer, local = self._route(obj)
        attr = layer.getattr_nowait(local)
        return None if attr is None else self._fix(slot, attr)

    def setattr(self, obj: ObjectId, attrs: SetAttr, cred: Cred) -> Attr:
        slot, layer, local = self._route(obj)
        return self._fix(slot, layer.setattr(local, attrs, cred))

    def lookup(self, directory: ObjectId, name: str) -> ObjectId:
        slot, layer, local = self._route(directory)
        return self._up(slot, layer, layer.lookup(local, name))

    def parent(self, directory: ObjectId) -> ObjectId:
        slot, layer, local = self._route(directory)
        up = layer.parent(local)  # raises NOTDIR for what is not a directory, at any level
        if slot != ROOT_SLOT and local.fileid == layer.root().fileid:
            return self.root()  # every folder is published at the top
        return self._global(slot, up)

    def read(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes | memoryview, bool]:
        slot, layer, local = self._route(obj)
        return layer.read(local, offset, count)

    def read_nowait(self, obj: ObjectId, offset: int, count: int) -> tuple[bytes | memoryview, bool, Attr] | None:
        slot, layer, local = self._route(obj)
        hit = layer.read_nowait(local, offset, count)
        if hit is None:
            return None
        return hit[0], hit[1], self._fix(slot, hit[2])

    def write(self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow) -> WriteResult:
        slot, layer, local = self._route(obj)
        return layer.write(local, offset, data, stable)

    def write_nowait(
        self, obj: ObjectId, offset: int, data: memoryview, stable: StableHow
    ) -> tuple[WriteResult, Attr] | None:
        slot, layer, local = self._route(obj)
        done = layer.write_nowait(local, offset, data, stable)
        return None if done is None else (done[0], self._fix(slot, done[1]))

    def commit(self, obj: ObjectId, offset: int, count: int) -> None:
        slot, layer, local = self._route(obj)
        layer.commit(local, offset, count)

    def readlink(self, obj: ObjectId) -> str:
        slot, layer, local = self._route(obj)
        return layer.readlink(local)

    def create(
        self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None, cred: Cred
    ) -> ObjectId:
        slot, layer, local = self._route(directory)
        return self._global(slot, layer.create(local, name, mode, attrs, verifier, cred))

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        slot, layer, local = self._route(directory)
        return self._global(slot, layer.mkdir(local, name, attrs, cred))

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        slot, layer, local = self._route(directory)
        return self._global(slot, layer.symlink(local, name, target, attrs, cred))

    def remove(self, directory: ObjectId, name: str) -> None:
        slot, layer, local = self._route(directory)
        layer.remove(local, name)

    def rmdir(self, directory: ObjectId, name: str) -> None:
        slot, layer, local = self._route(directory)
        layer.rmdir(local, name)

    def rename(self, from_dir: ObjectId, from_name: str, to_dir: ObjectId, to_name: str) -> None:
        s1, layer, l1 = self._route(from_dir)
        s2, _, l2 = self._route(to_dir)
        self._same_slot(s1, s2)
        layer.rename(l1, from_name, l2, to_name)

    def link(self, obj: ObjectId, directory: ObjectId, name: str) -> None:
        s1, layer, l1 = self._route(obj)
        s2, _, l2 = self._route(directory)
        self._same_slot(s1, s2)
        layer.link(l1, l2, name)

    def readdir(self, directory: ObjectId, cookie: int, verifier: int, count: int) -> ReadDirResult:
        slot, layer, local = self._route(directory)
        res = layer.readdir(local, cookie, verifier, count)  # the layer pages (nfsd.vfs.readdir_page)
        entries = []
        for e in res.entries:
            try:
                e.obj = self.parent(directory) if e.name == ".." else self._up(slot, layer, e.obj)
            except NFSError as exc:
                if exc.status == Status.NOENT:
                    continue  # a folder unpublished since the layer's listing: left out, cookies keep theirs
                raise
            entries.append(e)
        res.entries = entries
        return res

    def fsstat(self, obj: ObjectId) -> FsStat:
        slot, layer, local = self._route(obj)
        return layer.fsstat(local)

    def close(self) -> None:
        for layer in list(self._layers.values()):
            layer.close()

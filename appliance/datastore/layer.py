"""What the datastore's layers share: the id layout below a slot, and READDIR over a layer's own lookup.

Every layer is an ``nfsd.vfs.Backend`` over *local* ids (below ``LOCAL_MASK``); ``DatastoreBackend`` puts a
layer's slot in the top bits of the file ids it hands out. A real file's local id is its inode number, which
must stay below ``TAG_BIT``: ids with ``TAG_BIT`` set are the layer's own (an extent in a session folder, a
junction into a session folder in the root).
"""

from __future__ import annotations

from collections.abc import Sequence

from nfsd.localfs import LocalFS
from nfsd.vfs import Backend, CreateMode, Cred, NFSError, ObjectId, ReadDirResult, SetAttr, Status, readdir_page

LOCAL_BITS = 44
LOCAL_MASK = (1 << LOCAL_BITS) - 1
TAG_BIT = 1 << (LOCAL_BITS - 1)


class Layer(Backend):
    """A Backend the datastore stacks under one slot."""

    def junction(self, obj: ObjectId) -> int | None:
        """The slot whose root ``obj`` (an id this layer's LOOKUP/READDIR gave) stands for, or None."""
        return None


class FilesLayer(Layer):
    """A layer whose real files live in a LocalFS (``files``) beside names of its own that they must not take:
    CREATE, MKDIR and SYMLINK check ``_no_clash`` and then go to the files."""

    files: LocalFS

    def _no_clash(self, directory: ObjectId, name: str) -> None:
        """Raise NFSError(EXIST) if ``name`` in ``directory`` is one of the layer's own names."""
        raise NotImplementedError

    def create(
        self, directory: ObjectId, name: str, mode: CreateMode, attrs: SetAttr, verifier: bytes | None, cred: Cred
    ) -> ObjectId:
        self._no_clash(directory, name)
        return real(self.files.create(directory, name, mode, attrs, verifier, cred))

    def mkdir(self, directory: ObjectId, name: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        self._no_clash(directory, name)
        return real(self.files.mkdir(directory, name, attrs, cred))

    def symlink(self, directory: ObjectId, name: str, target: str, attrs: SetAttr, cred: Cred) -> ObjectId:
        self._no_clash(directory, name)
        return real(self.files.symlink(directory, name, target, attrs, cred))


def real(obj: ObjectId) -> ObjectId:
    """``obj``, an inode of a real file, checked to fit below the layer's own ids."""
    if obj.fileid >= TAG_BIT:
        raise NFSError(Status.SERVERFAULT, f"inode {obj.fileid} too large for this datastore's file ids")
    return obj


def page_by_lookup(
    layer: Backend, directory: ObjectId, names: Sequence[str], cookie: int, verifier: int, count: int
) -> ReadDirResult:
    """READDIR of ``directory`` holding ``names`` (sorted), each entry of the page resolved by ``layer.lookup``."""

    def resolve(_: int, name: str) -> ObjectId | None:  # only the page's names are looked up
        try:
            return layer.lookup(directory, name)
        except NFSError as exc:
            if exc.status == Status.NOENT:
                return None  # removed since the listing
            raise

    return readdir_page(directory, layer.parent(directory), names, cookie, verifier, count, resolve)

"""One small adapter per filesystem dissect can read, behind one interface: stat, listdir, open by path.

Detection is by each filesystem's magic, so an unknown or damaged volume is reported as such instead of
being half-parsed."""

from __future__ import annotations

import stat as st
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol

from appliance.errors import BootbackError, FileNotFoundInBackupError, FileRecoveryError

KINDS = ("file", "directory", "symlink", "other")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # one of KINDS
    size: int
    mtime: datetime | None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.kind,
            "size": self.size,
            "mtime": self.mtime.isoformat() if self.mtime else None,
        }


class FileSystem(Protocol):
    kind: str
    prefix: str

    def stat(self, path: str) -> Entry: ...
    def listdir(self, path: str) -> list[Entry]: ...
    def open(self, path: str) -> BinaryIO: ...
    def walk(self, path: str) -> Iterator[tuple[str, Entry, Callable[[], BinaryIO] | None]]: ...


def detect(fh: BinaryIO) -> str | None:
    """The filesystem on the volume ``fh`` by its magic: ext, xfs, ntfs, fat, or None."""
    fh.seek(0)
    head = fh.read(4096)
    if len(head) < 1082:
        return None
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return "fat"
    return None


def open_filesystem(fh: BinaryIO) -> FileSystem:
    kind = detect(fh)
    try:
        if kind in ("ext", "xfs"):
            return _InodeFS(fh, kind)
        if kind == "ntfs":
            return _NtfsFS(fh)
        if kind == "fat":
            return _FatFS(fh)
    except BootbackError:
        raise  # our own errors, e.g. a damaged chunk (IntegrityError) under the filesystem
    except Exception as exc:  # noqa: BLE001 - a parser's own error on damaged metadata
        raise FileRecoveryError(f"cannot read the {kind} filesystem: {exc}") from None
    raise FileRecoveryError("no filesystem bootback can read (ext2/3/4, XFS, NTFS, FAT)")


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


class _Base:
    """Path operations on top of four per-filesystem primitives on dissect's node objects: find a node by
    path, list a directory node's children, describe a node, open a file node. Walks go node to node, so a
    folder of thousands of files costs one directory scan each, not one lookup from the root per file."""

    prefix = ""  # the volume's place in the browser's tree ("/p1"), for messages

    def _where(self, path: str) -> str:
        return f"{self.prefix}/{'/'.join(_parts(path))}"

    def _missing(self, path: str) -> FileRecoveryError:
        return FileNotFoundInBackupError(f"no such file or directory: {self._where(path)}")

    # primitives -----------------------------------------------------------------------------------------
    def _lookup(self, path: str):  # noqa: ANN202 - a dissect node
        raise NotImplementedError

    def _children(self, node) -> Iterator[tuple[str, object]]:  # noqa: ANN001
        raise NotImplementedError

    def _entry(self, name: str, node) -> Entry:  # noqa: ANN001
        raise NotImplementedError

    def _open_node(self, node) -> BinaryIO:  # noqa: ANN001
        raise NotImplementedError

    # the interface ----------------------------------------------------------------------------------------
    def _node(self, path: str):  # noqa: ANN202 - paths arrive through FileBrowser.split, which refuses '..'
        try:
            return self._lookup(path)
        except BootbackError:
            raise
        except Exception:  # noqa: BLE001 - dissect raises its own not-found classes
            raise self._missing(path) from None

    def stat(self, path: str) -> Entry:
        parts = _parts(path)
        return self._entry(parts[-1] if parts else "", self._node(path))

    def _listing(self, node) -> list[tuple[Entry, object]]:  # noqa: ANN001
        out = [(self._entry(name, child), child) for name, child in self._children(node)]
        return sorted(out, key=lambda pair: pair[0].name)

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if self._entry("", node).kind != "directory":
            raise FileRecoveryError(f"not a directory: {self._where(path)}")
        return [entry for entry, _ in self._listing(node)]

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if self._entry("", node).kind != "file":
            raise FileRecoveryError(f"not a regular file: {self._where(path)}")
        return self._open_node(node)

    def walk(self, path: str) -> Iterator[tuple[str, Entry, Callable[[], BinaryIO] | None]]:
        """Everything below the directory ``path``, depth first: (relative path, entry, opener for files)."""
        node = self._node(path)
        if self._entry("", node).kind != "directory":
            raise FileRecoveryError(f"not a directory: {self._where(path)}")
        yield from self._walk(node, "")

    def _walk(self, node, rel: str) -> Iterator[tuple[str, Entry, Callable[[], BinaryIO] | None]]:  # noqa: ANN001
        for entry, child in self._listing(node):
            sub = f"{rel}/{entry.name}" if rel else entry.name
            opener = (lambda c=child: self._open_node(c)) if entry.kind == "file" else None
            yield sub, entry, opener
            if entry.kind == "directory":
                yield from self._walk(child, sub)


class _InodeFS(_Base):
    """ext2/3/4 and XFS: dissect gives both the same inode interface."""

    def __init__(self, fh: BinaryIO, kind: str) -> None:
        if kind == "ext":
            from dissect.extfs import ExtFS

            self.fs = ExtFS(fh)
        else:
            from dissect.xfs import XFS

            self.fs = XFS(fh)
        self.kind = kind

    def _lookup(self, path: str):  # noqa: ANN202
        return self.fs.get("/" + "/".join(_parts(path)))

    def _children(self, node) -> Iterator[tuple[str, object]]:  # noqa: ANN001
        return ((name, child) for name, child in node.listdir().items() if name not in (".", ".."))

    def _entry(self, name: str, node) -> Entry:  # noqa: ANN001
        kind = {st.S_IFREG: "file", st.S_IFDIR: "directory", st.S_IFLNK: "symlink"}.get(node.filetype, "other")
        try:
            mtime = node.mtime
        except Exception:  # noqa: BLE001
            mtime = None
        return Entry(name, kind, node.size if kind == "file" else 0, mtime)

    def _open_node(self, node) -> BinaryIO:  # noqa: ANN001
        return node.open()


class _FatFS(_Base):
    kind = "fat"

    def __init__(self, fh: BinaryIO) -> None:
        from dissect.fat import FATFS

        self.fs = FATFS(fh)

    def _lookup(self, path: str):  # noqa: ANN202
        return self.fs.get("/".join(_parts(path)))

    def _children(self, node) -> Iterator[tuple[str, object]]:  # noqa: ANN001
        return ((c.name, c) for c in node.iterdir() if not c.is_volume_id() and c.name not in (".", ".."))

    def _entry(self, name: str, node) -> Entry:  # noqa: ANN001
        is_dir = node.is_directory()
        try:
            mtime = node.mtime
        except Exception:  # noqa: BLE001 - the root directory has no timestamps
            mtime = None
        return Entry(name or node.name or "", "directory" if is_dir else "file", 0 if is_dir else node.size, mtime)

    def _open_node(self, node) -> BinaryIO:  # noqa: ANN001
        return node.open()


class _NtfsFS(_Base):
    kind = "ntfs"

    def __init__(self, fh: BinaryIO) -> None:
        from dissect.ntfs import NTFS

        self.fs = NTFS(fh)
        self.root = self.fs.mft.get("")

    def _lookup(self, path: str):  # noqa: ANN202
        return self.fs.mft.get("\\".join(_parts(path)))

    def _children(self, node) -> Iterator[tuple[str, object]]:  # noqa: ANN001
        at_root = node.segment == self.root.segment
        for name, child in node.listdir(dereference=True, ignore_dos=True).items():
            if name in (".", "..") or (at_root and name.startswith("$")):
                continue  # NTFS metadata files ($MFT, $Bitmap ...) are not what users recover
            yield name, child

    def _listing(self, node) -> list[tuple[Entry, object]]:  # noqa: ANN001
        return sorted(super()._listing(node), key=lambda pair: pair[0].name.lower())

    def _entry(self, name: str, node) -> Entry:  # noqa: ANN001
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

        is_dir = node.is_dir()
        try:
            mtime = node.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION][0].last_modification_time
        except Exception:  # noqa: BLE001
            mtime = None
        size = 0
        if not is_dir:
            try:
                size = node.size()
            except Exception:  # noqa: BLE001 - no unnamed data stream
                size = 0
        return Entry(name, "directory" if is_dir else "file", size, mtime)

    def _open_node(self, node) -> BinaryIO:  # noqa: ANN001
        return node.open()

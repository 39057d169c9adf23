"""One small adapter per filesystem dissect can read, behind one interface: stat, listdir, open by path.

Detection is by each filesystem's magic, so an unknown or damaged volume is reported as such instead of
being half-parsed."""

from __future__ import annotations

import stat as st
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
        return {"name": self.name, "type": self.kind, "size": self.size,
                "mtime": self.mtime.isoformat() if self.mtime else None}  # fmt: skip


class FileSystem(Protocol):
    kind: str
    prefix: str

    def stat(self, path: str) -> Entry: ...
    def listdir(self, path: str) -> list[Entry]: ...
    def open(self, path: str) -> BinaryIO: ...


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
    prefix = ""  # the volume's place in the browser's tree ("/p1"), for messages

    def _where(self, path: str) -> str:
        return f"{self.prefix}/{'/'.join(_parts(path))}"

    def _missing(self, path: str) -> FileRecoveryError:
        return FileNotFoundInBackupError(f"no such file or directory: {self._where(path)}")


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

    def _node(self, path: str):  # noqa: ANN202 - a dissect inode
        if ".." in _parts(path):
            raise FileRecoveryError(f"'..' is not allowed in paths: {path}")
        try:
            return self.fs.get("/" + "/".join(_parts(path)))
        except BootbackError:
            raise
        except Exception:  # noqa: BLE001 - dissect raises its own FileNotFoundError classes
            raise self._missing(path) from None

    @staticmethod
    def _entry(name: str, node) -> Entry:  # noqa: ANN001
        ft = node.filetype
        kind = {st.S_IFREG: "file", st.S_IFDIR: "directory", st.S_IFLNK: "symlink"}.get(ft, "other")
        try:
            mtime = node.mtime
        except Exception:  # noqa: BLE001
            mtime = None
        return Entry(name, kind, node.size if kind == "file" else 0, mtime)

    def stat(self, path: str) -> Entry:
        parts = _parts(path)
        return self._entry(parts[-1] if parts else "", self._node(path))

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if node.filetype != st.S_IFDIR:
            raise FileRecoveryError(f"not a directory: {self._where(path)}")
        return sorted((self._entry(name, child) for name, child in node.listdir().items() if name not in (".", "..")),
                      key=lambda e: e.name)  # fmt: skip

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if node.filetype != st.S_IFREG:
            raise FileRecoveryError(f"not a regular file: {self._where(path)}")
        return node.open()


class _FatFS(_Base):
    kind = "fat"

    def __init__(self, fh: BinaryIO) -> None:
        from dissect.fat import FATFS

        self.fs = FATFS(fh)

    def _node(self, path: str):  # noqa: ANN202
        try:
            return self.fs.get("/".join(_parts(path)))
        except BootbackError:
            raise
        except Exception:  # noqa: BLE001
            raise self._missing(path) from None

    @staticmethod
    def _entry(node) -> Entry:  # noqa: ANN001
        is_dir = node.is_directory()
        try:
            mtime = node.mtime
        except Exception:  # noqa: BLE001
            mtime = None
        return Entry(node.name or "", "directory" if is_dir else "file", 0 if is_dir else node.size, mtime)

    def stat(self, path: str) -> Entry:
        return self._entry(self._node(path))

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if not node.is_directory():
            raise FileRecoveryError(f"not a directory: {self._where(path)}")
        out = [self._entry(c) for c in node.iterdir() if not c.is_volume_id() and c.name not in (".", "..")]
        return sorted(out, key=lambda e: e.name)

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if node.is_directory():
            raise FileRecoveryError(f"not a regular file: {self._where(path)}")
        return node.open()


class _NtfsFS(_Base):
    kind = "ntfs"

    def __init__(self, fh: BinaryIO) -> None:
        from dissect.ntfs import NTFS

        self.fs = NTFS(fh)

    def _node(self, path: str):  # noqa: ANN202
        try:
            return self.fs.mft.get("\\".join(_parts(path)))
        except BootbackError:
            raise
        except Exception:  # noqa: BLE001
            raise self._missing(path) from None

    @staticmethod
    def _entry(name: str, record) -> Entry:  # noqa: ANN001
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

        is_dir = record.is_dir()
        try:
            mtime = record.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION][0].last_modification_time
        except Exception:  # noqa: BLE001
            mtime = None
        size = 0
        if not is_dir:
            try:
                size = record.size()
            except Exception:  # noqa: BLE001 - no unnamed data stream
                size = 0
        return Entry(name, "directory" if is_dir else "file", size, mtime)

    def stat(self, path: str) -> Entry:
        parts = _parts(path)
        return self._entry(parts[-1] if parts else "", self._node(path))

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if not node.is_dir():
            raise FileRecoveryError(f"not a directory: {self._where(path)}")
        out = []
        for name, child in node.listdir(dereference=True, ignore_dos=True).items():
            if name in (".", "..") or (name.startswith("$") and not _parts(path)):
                continue  # NTFS metadata files ($MFT, $Bitmap ...) are not what users recover
            out.append(self._entry(name, child))
        return sorted(out, key=lambda e: e.name.lower())

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if node.is_dir():
            raise FileRecoveryError(f"not a regular file: {self._where(path)}")
        return node.open()

"""Browse a restore point's disk like a file tree: ``/`` lists its volumes (partitions, or the whole disk
when it has no partition table), ``/p1/etc/hostname`` is a file inside the first partition's filesystem."""

from __future__ import annotations

import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from dissect.util.stream import RangeStream

from appliance.errors import BootbackError, FileNotFoundInBackupError, FileRecoveryError
from appliance.files.filesystems import Entry, FileSystem, detect, open_filesystem
from appliance.files.stream import DiskStream
from appliance.repo.reader import DiskReader

__all__ = ["Entry", "FileBrowser", "Volume", "browse"]


@dataclass(frozen=True)
class Volume:
    id: str  # "p1", "p2" ... or "disk" for a disk without a partition table
    offset: int
    size: int
    description: str
    filesystem: str | None  # ext, xfs, ntfs, fat, or None when none is recognised

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "offset": self.offset,
            "size": self.size,
            "description": self.description,
            "filesystem": self.filesystem,
        }


def _describe(partition) -> str:  # noqa: ANN001 - a dissect Partition
    """'Linux filesystem data', 'Linux', 'Basic data partition', with the GPT name first when it has one."""
    text = str(partition.type_str or partition.type)
    m = re.search(r"\(([^()]*)\)\s*$", text)
    kind = m[1] if m else text
    name = (partition.name or "").strip("\x00 ")
    return f"{name} ({kind})" if name else kind


class FileBrowser:
    """Read-only; one per user request (the parsers keep file positions, so it is not thread-safe)."""

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self._volumes: list[Volume] | None = None
        self._filesystems: dict[str, FileSystem] = {}
        self._openers: dict[str, Callable[[], BinaryIO]] = {}  # volumes that are not byte ranges of the disk

    def _stream(self, volume: Volume) -> BinaryIO:
        if volume.id in self._openers:
            return self._openers[volume.id]()
        disk = DiskStream(self.reader)
        if volume.id == "disk":
            return disk
        return RangeStream(disk, volume.offset, volume.size)

    def volumes(self) -> list[Volume]:
        if self._volumes is None:
            self._volumes = self._find_volumes()
        return self._volumes

    def _find_volumes(self) -> list[Volume]:
        from dissect.volume.disk import Disk

        disk = DiskStream(self.reader)
        whole = Volume("disk", 0, self.reader.size, "whole disk", detect(disk))
        if whole.filesystem is not None:  # a filesystem straight on the disk, no partition table
            return [whole]
        out: list[Volume] = []
        try:
            disk.seek(0)
            parts = Disk(disk).partitions
        except BootbackError:
            raise
        except Exception:  # noqa: BLE001 - dissect: no partition scheme it knows
            parts = []
        for p in sorted(parts, key=lambda p: p.offset):
            if p.size <= 0 or p.type in (0x05, 0x0F, 0x85):  # extended-partition containers hold no filesystem
                continue
            vol = Volume(f"p{p.number}", p.offset, p.size, _describe(p), None)
            out.append(replace(vol, filesystem=detect(self._stream(vol))))
        out = out or [whole]
        return out + [lv for vol in out if vol.filesystem is None for lv in self._logical_volumes(vol)]

    def _logical_volumes(self, pv: Volume) -> list[Volume]:
        """The LVM2 logical volumes of a physical volume (one PV per volume group: a VG spread over several
        disks is not assembled). Named like /dev/mapper: VG-LV."""
        fh = self._stream(pv)
        fh.seek(512)
        label = fh.read(32)
        if label[:8] != b"LABELONE" or label[24:32] != b"LVM2 001":
            return []
        from dissect.volume.lvm import LVM2

        try:
            vg = LVM2(fh).volume_group
            lvs = [lv for lv in vg.lv if lv.is_visible]
        except BootbackError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged or multi-disk LVM metadata
            return [
                Volume(f"{pv.id}-lvm", pv.offset, pv.size, f"LVM2 physical volume that cannot be read: {exc}", None)
            ]
        out = []
        for lv in lvs:
            vid = f"{vg.name}-{lv.name}"
            self._openers[vid] = lambda lv_name=lv.name: self._open_lv(pv, lv_name)  # later, on a fresh stream
            stream = lv.open()
            size = getattr(stream, "size", None) or 0
            out.append(Volume(vid, 0, size, f"LVM logical volume {vg.name}/{lv.name} on {pv.id}", detect(stream)))
        return out

    def _open_lv(self, pv: Volume, name: str) -> BinaryIO:
        from dissect.volume.lvm import LVM2

        return LVM2(self._stream(pv)).volume_group.logical_volumes[name].open()

    def volume(self, volume_id: str) -> Volume:
        for v in self.volumes():
            if v.id == volume_id:
                return v
        known = ", ".join(v.id for v in self.volumes())
        raise FileNotFoundInBackupError(f"no volume {volume_id!r} on this disk (volumes: {known})")

    def filesystem(self, volume_id: str) -> FileSystem:
        if volume_id not in self._filesystems:
            vol = self.volume(volume_id)
            if vol.filesystem is None:
                raise FileRecoveryError(
                    f"volume {volume_id} ({vol.description}) holds no filesystem bootback can "
                    "read (ext2/3/4, XFS, NTFS, FAT)"
                )
            fs = open_filesystem(self._stream(vol))
            fs.prefix = f"/{volume_id}"
            self._filesystems[volume_id] = fs
        return self._filesystems[volume_id]

    @staticmethod
    def split(path: str) -> tuple[str | None, str]:
        """'/p1/etc/hostname' -> ('p1', '/etc/hostname'); '/' -> (None, '/')."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise FileRecoveryError(f"'..' is not allowed in paths: {path}")
        if not parts:
            return None, "/"
        return parts[0], "/" + "/".join(parts[1:])

    def listdir(self, path: str) -> list[Entry]:
        vol, inner = self.split(path)
        if vol is None:
            return [Entry(v.id, "directory", 0, None) for v in self.volumes()]
        return self.filesystem(vol).listdir(inner)

    def stat(self, path: str) -> Entry:
        vol, inner = self.split(path)
        if vol is None:
            return Entry("", "directory", 0, None)
        if inner == "/":
            self.volume(vol)
            return Entry(vol, "directory", 0, None)
        return self.filesystem(vol).stat(inner)

    def open(self, path: str) -> BinaryIO:
        vol, inner = self.split(path)
        if vol is None or inner == "/":
            raise FileRecoveryError(f"not a regular file: {path}")
        return self.filesystem(vol).open(inner)

    def walk(self, path: str) -> Iterator[tuple[str, Entry, Callable[[], BinaryIO] | None]]:
        """Everything below the directory ``path``, depth first: (path relative to it, entry, opener of a file)."""
        vol, inner = self.split(path)
        if vol is None:
            for v in self.volumes():
                yield v.id, Entry(v.id, "directory", 0, None), None
                if v.filesystem is not None:
                    for rel, entry, opener in self.filesystem(v.id).walk("/"):
                        yield f"{v.id}/{rel}", entry, opener
            return
        yield from self.filesystem(vol).walk(inner)

    def write_tar(self, path: str, out: BinaryIO) -> int:
        """A directory (or one file) as an uncompressed tar stream; returns the number of files written.
        Symlinks and special files are skipped: only their targets' contents matter to a recovery."""
        base = path.rstrip("/").rsplit("/", 1)[-1] or "disk"
        count = 0
        top = self.stat(path)
        if top.kind == "file":
            items = [("", top, lambda: self.open(path))]
        else:
            items = [("", top, None), *self.walk(path)]
        with tarfile.open(fileobj=out, mode="w|") as tar:
            for rel, entry, opener in items:
                info = tarfile.TarInfo(f"{base}/{rel}" if rel else base)
                info.mtime = int(entry.mtime.timestamp()) if entry.mtime else int(time.time())
                if entry.kind == "directory":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif entry.kind == "file" and opener is not None:
                    info.size, info.mode = entry.size, 0o644
                    with opener() as fh:
                        tar.addfile(info, fh)
                    count += 1
        return count


def browse(repo, point, disk: str | None = None) -> FileBrowser:  # noqa: ANN001 - Repository, RestorePoint
    """A browser over one disk of a restore point; ``disk`` may be omitted when the point has one disk."""
    if disk is None:
        if len(point.disks) != 1:
            names = ", ".join(d.name for d in point.disks)
            raise FileRecoveryError(f"{point.ref} has {len(point.disks)} disks ({names}): choose one")
        disk = point.disks[0].name
    return FileBrowser(repo.open_disk(point, disk))

"""Source disks for a backup: raw images, VMDK, qcow2, VHD/VHDX (read with dissect.hypervisor), stdin.

``open_source`` sniffs the format from the file's magic bytes, not its name; a file whose name promises a
format its bytes do not have, or an image that ends before its declared size, is a SourceError.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.errors import SourceError

SECTOR = 512
_NAMED_FORMATS = {".vmdk": "vmdk", ".qcow2": "qcow2", ".vhd": "vhd", ".vhdx": "vhdx"}


@dataclass
class DiskSource:
    """A readable source disk. ``stream`` yields the guest-visible bytes from offset 0, ``size`` of them."""

    name: str
    size: int | None  # None for stdin: known only at the end
    format: str
    stream: BinaryIO
    path: Path | None = None
    adapter: str | None = None
    geometry: dict[str, int] | None = None
    extra_files: list[Path] = field(default_factory=list)

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


def sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            tail = b""
            if size >= SECTOR:
                f.seek(size - SECTOR)
                tail = f.read(SECTOR)
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory; pass a VM folder as the only DISK, or use --vmx") from None
    except OSError as exc:
        raise SourceError(f"cannot read source disk {path}: {exc.strerror}") from None
    if head.startswith(b"# Disk DescriptorFile") or head.startswith(b"# Disk Descriptor"):
        return "vmdk"
    if head[:4] in (b"KDMV", b"COWD"):
        return "vmdk"
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if tail[:8] == b"conectix" or head[:8] == b"conectix":
        return "vhd"
    declared = _NAMED_FORMATS.get(path.suffix.lower())
    if declared and not path.name.lower().endswith("-flat.vmdk"):
        raise SourceError(f"{path}: unknown format: named like {declared} but its content is not a {declared} image")
    return "raw"


def _vmdk_info(path: Path) -> tuple[str | None, dict[str, int] | None]:
    """Adapter type and geometry from a VMDK's embedded or separate descriptor, when it has one."""
    from dissect.hypervisor.disk.vmdk import DiskDescriptor

    with open(path, "rb") as f:
        head = f.read(SECTOR * 4)
    text: str | None = None
    if head.startswith(b"# Disk Descriptor"):
        text = Path(path).read_text(errors="replace")
    elif head[:4] == b"KDMV":
        # The sparse header names the embedded descriptor: offset (u64 at 28) and size (u64 at 36), in sectors.
        off = int.from_bytes(head[28:36], "little") * SECTOR
        size = int.from_bytes(head[36:44], "little") * SECTOR
        if off and 0 < size <= 1 << 20:
            with open(path, "rb") as f:
                f.seek(off)
                text = f.read(size).split(b"\0", 1)[0].decode(errors="replace")
    if not text:
        return None, None
    desc = DiskDescriptor.parse(text)
    adapter = desc.ddb.get("ddb.adapterType")
    try:
        geometry = {
            "cylinders": int(desc.ddb["ddb.geometry.cylinders"]),
            "heads": int(desc.ddb["ddb.geometry.heads"]),
            "sectors": int(desc.ddb["ddb.geometry.sectors"]),
        }
    except (KeyError, ValueError):
        geometry = None
    return adapter, geometry


def open_source(path: Path | str, name: str | None = None) -> DiskSource:
    """Open a source disk file; ``-`` means a raw disk on stdin."""
    if str(path) == "-":
        return DiskSource(name=name or "disk0", size=None, format="raw", stream=sys.stdin.buffer)
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source disk {path} does not exist")
    fmt = sniff(path)
    disk_name = name or path.name.removesuffix("-flat.vmdk")
    try:
        if fmt == "raw":
            f = open(path, "rb")  # noqa: SIM115 - owned by the DiskSource
            return DiskSource(disk_name, os.fstat(f.fileno()).st_size, "raw", f, path)
        if fmt == "vmdk":
            from dissect.hypervisor.disk.vmdk import VMDK

            stream = VMDK(path)
            adapter, geometry = _vmdk_info(path)
            kind = "vmdk"
            if stream.descriptor is not None:
                kind = f"vmdk-{stream.descriptor.attr.get('createType', 'descriptor')}"
            elif stream.disks and getattr(stream.disks[0], "descriptor", None) is not None:
                kind = f"vmdk-{stream.disks[0].descriptor.attr.get('createType', 'sparse')}"
            return DiskSource(disk_name, stream.size, kind, DirectStream(stream, stream.size), path, adapter, geometry)
        if fmt == "qcow2":
            from dissect.hypervisor.disk.qcow2 import QCow2

            q = QCow2(open(path, "rb"))  # noqa: SIM115
            stream = q.open()
            return DiskSource(disk_name, stream.size, "qcow2", DirectStream(stream, stream.size), path)
        if fmt == "vhdx":
            from dissect.hypervisor.disk.vhdx import VHDX

            stream = VHDX(open(path, "rb"))  # noqa: SIM115
            return DiskSource(disk_name, stream.size, "vhdx", DirectStream(stream, stream.size), path)
        from dissect.hypervisor.disk.vhd import VHD

        stream = VHD(open(path, "rb"))  # noqa: SIM115
        return DiskSource(disk_name, stream.size, "vhd", DirectStream(stream, stream.size), path)
    except SourceError:
        raise
    except Exception as exc:  # dissect raises many kinds on damaged input; all mean the same to a user
        raise SourceError(f"cannot open {path} as {fmt}: {type(exc).__name__}: {exc}") from exc


class DirectStream:
    """Sequential reads straight from a dissect stream's ``_read(offset, length)``, clamped to its size.

    dissect's AlignedStream buffers in 1 MiB blocks and some readers (VMDK) fail on a block that runs past
    the end of the disk; reading sector-aligned spans that stop at the end avoids that, and a copy.
    """

    def __init__(self, stream, size: int) -> None:
        self._stream = stream
        self._size = size
        self._pos = 0

    def read(self, n: int) -> bytes:
        n = min(n, self._size - self._pos)
        if n <= 0:
            return b""
        span = min(-(-n // SECTOR) * SECTOR, max(self._size - self._pos, 0) if self._size % SECTOR == 0 else 1 << 62)
        data = self._stream._read(self._pos, span)[:n]
        self._pos += len(data)
        return data

    def close(self) -> None:
        fh = getattr(self._stream, "fh", None)
        if fh is not None:
            fh.close()


def read_exact(stream: BinaryIO, buf: bytearray | memoryview, what: str) -> int:
    """Fill ``buf`` from ``stream``; returns the bytes read (short only at end of stream)."""
    view = memoryview(buf)
    got = 0
    try:
        readinto = getattr(stream, "readinto", None)
        while got < len(view):
            if readinto is not None and isinstance(stream, io.BufferedIOBase | io.RawIOBase):
                n = readinto(view[got:])
            else:
                data = stream.read(len(view) - got)
                n = len(data)
                view[got : got + n] = data
            if not n:
                break
            got += n
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read {what}: {type(exc).__name__}: {exc}") from exc
    return got

"""What a published VM folder holds besides its data: a .vmx made from the backed-up one and a monolithicFlat
.vmdk descriptor per disk, pointing at its -flat.vmdk extent."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from appliance.ingest.vmfolder import parse_vmx_disks
from appliance.repo.manifest import DiskEntry

SECTOR = 512
_VMX_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')


@dataclass
class PublishedDisk:
    descriptor_name: str  # web01.vmdk
    extent_name: str  # web01-flat.vmdk
    entry: DiskEntry

    @property
    def extent_size(self) -> int:
        """The extent is whole sectors; bytes past the backed-up size read as zeros."""
        return -(-self.entry.size // SECTOR) * SECTOR


def disk_names(disks: list[DiskEntry]) -> list[PublishedDisk]:
    """Published names: the backed-up name with a .vmdk suffix, made unique."""
    out: list[PublishedDisk] = []
    used: set[str] = set()
    for i, d in enumerate(disks):
        base = re.sub(r"(-flat)?\.(vmdk|img|raw|qcow2|vhdx?|bin)$", "", d.name, flags=re.I) or f"disk{i}"
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out.append(PublishedDisk(f"{name}.vmdk", f"{name}-flat.vmdk", d))
    return out


def geometry(d: PublishedDisk, adapter: str) -> tuple[int, int, int]:
    if d.entry.geometry:
        g = d.entry.geometry
        return g["cylinders"], g["heads"], g["sectors"]
    heads, sectors = (16, 63) if adapter == "ide" else (255, 63)
    cylinders = max(1, min(65535, d.extent_size // SECTOR // (heads * sectors)))
    return cylinders, heads, sectors


def vmdk_descriptor(d: PublishedDisk, adapter: str | None = None) -> str:
    """A monolithicFlat descriptor; the CID is derived from the disk so it is stable across restarts."""
    adapter = adapter or d.entry.adapter or "lsilogic"
    c, h, s = geometry(d, adapter)
    cid = zlib.crc32(f"{d.entry.name}:{d.entry.size}:{''.join(c or '-' for c in d.entry.chunks[:8])}".encode())
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n# Extent description\n"
        f'RW {d.extent_size // SECTOR} FLAT "{d.extent_name}" 0\n'
        "\n# The Disk Data Base\n#DDB\n\n"
        'ddb.virtualHWVersion = "14"\n'
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.geometry.cylinders = "{c}"\n'
        f'ddb.geometry.heads = "{h}"\n'
        f'ddb.geometry.sectors = "{s}"\n'
    )


# A value naming something outside the VM's own folder: an absolute POSIX, drive-letter or UNC path, or a '..'.
_OUTSIDE = re.compile(r"^\s*(/|[A-Za-z]:[\\/]|\\\\)|(^|[\\/])\.\.([\\/]|$)")
_DISK_DEVICE = re.compile(r"^(scsi|sata|ide|nvme)\d+:\d+$")


def _points_outside(value: str) -> bool:
    return bool(_OUTSIDE.search(value))


def _devices_to_drop(parsed: list[tuple[str, re.Match[str] | None]], published: dict[str, PublishedDisk]) -> set[str]:
    """Devices of the backed-up .vmx that must not reach the hypervisor: a disk device whose file is not one we
    publish, and any device whose file lies outside the published folder (a raw device, another VM's disk, a host
    file behind a serial port). The whole device goes, so no half-configured device is left to fail power-on."""
    drop = set()
    for _, m in parsed:
        if m is None or not m.group(1).lower().endswith(".filename"):
            continue
        device = m.group(1).lower().rsplit(".", 1)[0]
        if device in published:
            continue
        if _DISK_DEVICE.match(device) or _points_outside(m.group(2)):
            drop.add(device)
    return drop


def published_vmx(vm: str, point_id: str, vmx_text: str | None, disks: list[PublishedDisk], label: str) -> str:
    """The backed-up .vmx with its disk paths pointing at the published descriptors and a display name that
    marks the recovery; a minimal .vmx when the backup has none."""
    if not vmx_text:
        lines = [
            '.encoding = "UTF-8"',
            'config.version = "8"',
            'virtualHW.version = "14"',
            'guestOS = "other-64"',
            'memSize = "1024"',
            'numvcpus = "1"',
            'scsi0.present = "TRUE"',
            'scsi0.virtualDev = "lsilogic"',
        ]
        for i, d in enumerate(disks):
            slot = i if i < 7 else i + 1  # scsi0:7 is the controller
            lines += [f'scsi0:{slot}.present = "TRUE"', f'scsi0:{slot}.fileName = "{d.descriptor_name}"']
        lines.append(f'displayName = "{vm} ({label} {point_id})"')
        return "\n".join(lines) + "\n"
    by_file = {}
    for entry in parse_vmx_disks(vmx_text):
        base = entry.filename.replace("\\", "/").rsplit("/", 1)[-1]
        by_file[base] = entry.device
    device_to_disk = {}
    for d in disks:
        dev = by_file.get(d.entry.name)
        if dev:
            device_to_disk[dev.lower()] = d
    parsed = [(line, _VMX_LINE.match(line)) for line in vmx_text.splitlines()]
    dropped = _devices_to_drop(parsed, device_to_disk)
    out = []
    seen_display = False
    for line, m in parsed:
        if m is None:
            if line.strip() and not line.lstrip().startswith("#"):
                continue  # not .vmx grammar: never hand the hypervisor something we did not understand
            out.append(line)
            continue
        key, value = m.group(1), m.group(2)
        lower = key.lower()
        device = lower.rsplit(".", 1)[0]
        if device in dropped:
            continue
        if lower.endswith(".filename") and device in device_to_disk:
            line = f'{key} = "{device_to_disk[device].descriptor_name}"'
        elif lower == "displayname":
            line = f'{key} = "{value.replace(chr(34), "")} ({label} {point_id})"'
            seen_display = True
        elif lower in ("sched.swap.derivedname", "checkpoint.vmstate"):
            continue  # points into the original datastore
        elif _points_outside(value):
            continue  # an absolute path or '..': outside the published folder (another VM's files, a device)
        out.append(line)
    if not seen_display:
        out.append(f'displayName = "{vm} ({label} {point_id})"')
    return "\n".join(out) + "\n"

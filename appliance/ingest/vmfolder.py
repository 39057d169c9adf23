"""A VM folder as a backup source: the .vmx plus the disks it names, with their controller keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.errors import SourceError

DISK_BUSES = ("scsi", "sata", "ide", "nvme")
DISK_SUFFIXES = (".vmdk", ".img", ".raw", ".qcow2", ".vhd", ".vhdx")


@dataclass
class VmxDisk:
    device: str  # e.g. "scsi0:0"
    filename: str  # as written in the .vmx, relative to its folder unless absolute


def parse_vmx_disks(vmx_text: str) -> list[VmxDisk]:
    """The disk devices a .vmx names (present, of disk type), in device order."""
    from dissect.hypervisor.descriptor.vmx import VMX

    attr = VMX.parse(vmx_text).attr
    disks = []
    for key, value in attr.items():
        lower = key.lower()
        if not lower.endswith(".filename") or not lower.startswith(DISK_BUSES):
            continue
        device = key[: -len(".fileName")]
        dev_type = attr.get(f"{device}.deviceType", attr.get(f"{device}.devicetype", "disk")).lower()
        present = attr.get(f"{device}.present", "TRUE").upper() == "TRUE"
        if present and "disk" in dev_type and value.lower().endswith(DISK_SUFFIXES):
            disks.append(VmxDisk(device=device, filename=value))
    return sorted(disks, key=lambda d: d.device)


def find_vmx(folder: Path) -> Path:
    found = sorted(folder.glob("*.vmx"))
    if len(found) != 1:
        raise SourceError(f"VM folder {folder} must hold exactly one .vmx, found {len(found)}")
    return found[0]


def resolve_disk(vmx_path: Path, filename: str) -> Path:
    path = Path(filename)
    if not path.is_absolute():
        path = vmx_path.parent / path
    if not path.exists():
        raise SourceError(f"{vmx_path.name} names disk {filename!r} but {path} does not exist")
    return path

"""published_vmx: the .vmx of a published VM folder, made from the backed-up one (public function only)."""

from __future__ import annotations

import re

import pytest

from appliance.datastore.descriptors import PublishedDisk, disk_names, published_vmx
from appliance.repo.manifest import DiskEntry

BACKED_UP = """.encoding = "UTF-8"
displayName = "web01"
memSize = "4096"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "/vmfs/volumes/ds1/web01/web01_1.vmdk"
sched.swap.derivedName = "/vmfs/volumes/ds1/web01/web01-1234.vswp"
checkpoint.vmState = "web01.vmss"
"""


def disks(*names: str) -> list[PublishedDisk]:
    return disk_names([DiskEntry(name, 1 << 20, 1 << 20, [None]) for name in names])


def values(vmx: str) -> dict[str, str]:
    out = {}
    for line in vmx.splitlines():
        m = re.match(r'^\s*([^=\s]+)\s*=\s*"(.*)"\s*$', line)
        assert m, f"not a .vmx line: {line!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_disks_point_at_the_published_descriptors_and_the_name_marks_the_recovery() -> None:
    v = values(published_vmx("web01", "20261129T2300", BACKED_UP, disks("web01.vmdk", "web01_1.vmdk"), "recovery"))
    assert v["scsi0:0.filename"] == "web01.vmdk" and v["scsi0:1.filename"] == "web01_1.vmdk"  # folder-relative
    assert v["displayname"] == "web01 (recovery 20261129T2300)"
    assert "sched.swap.derivedname" not in v and "checkpoint.vmstate" not in v  # pointed at the original datastore
    assert v["memsize"] == "4096"


def test_without_a_backed_up_vmx_a_minimal_one_names_every_disk() -> None:
    published = disks(*(f"d{i}.raw" for i in range(9)))
    v = values(published_vmx("db01", "p1", None, published, "sandbox"))
    names = {k: val for k, val in v.items() if k.endswith(".filename")}
    assert sorted(names.values()) == sorted(d.descriptor_name for d in published)
    assert "scsi0:7.filename" not in names  # the controller's own unit
    assert v["displayname"] == "db01 (sandbox p1)"


HOSTILE = [
    'scsi0:2.present = "TRUE"\nscsi0:2.fileName = "/vmfs/volumes/ds1/other-vm/other-vm-flat.vmdk"',
    'ide0:0.present = "TRUE"\nide0:0.deviceType = "rawDisk"\nide0:0.fileName = "/dev/sda"',
    'serial0.present = "TRUE"\nserial0.fileType = "file"\nserial0.fileName = "/etc/passwd"',
    'nvram = "/vmfs/volumes/ds1/other-vm/other-vm.nvram"',
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=["other-vm-disk", "raw-device", "serial-file", "nvram"])
def test_no_line_of_a_hostile_vmx_points_outside_the_published_folder(hostile: str) -> None:
    vmx = published_vmx("web01", "p1", BACKED_UP + hostile + "\n", disks("web01.vmdk", "web01_1.vmdk"), "recovery")
    absolute = [line for line in vmx.splitlines() if re.search(r'=\s*"\s*(/|[A-Za-z]:\\\\|\\\\\\\\)', line)]
    assert absolute == []


def test_only_the_hostile_devices_go_and_nothing_half_configured_is_left() -> None:
    extra = (
        'nvram = "web01.nvram"\n'  # inside the folder: kept
        'ide1:0.present = "TRUE"\nide1:0.deviceType = "cdrom-image"\nide1:0.fileName = "/vmfs/volumes/iso/d.iso"\n'
        'serial1.present = "TRUE"\nserial1.fileName = "../other-vm/serial.log"\n'
        "extendedConfigFile = /etc/shadow\n"  # not .vmx grammar (unquoted): dropped, never passed on
        'annotation = "a \\"quoted\\" note"\n'
        'displayName = "web01\\" evil = \\"x"\n'
    )
    vmx = published_vmx(
        "web01",
        "p1",
        BACKED_UP.replace('displayName = "web01"\n', "") + extra,
        disks("web01.vmdk", "web01_1.vmdk"),
        "recovery",
    )
    keys = [line.split("=", 1)[0].strip().lower() for line in vmx.splitlines() if line.strip()]
    assert "nvram" in keys and "memsize" in keys
    assert not [k for k in keys if k.startswith(("ide1:0.", "serial1."))]  # the whole device, not only its file
    assert "extendedconfigfile" not in keys and "/etc/shadow" not in vmx
    display = [line for line in vmx.splitlines() if line.lower().startswith("displayname")]
    assert display == ['displayName = "web01\\ evil = \\x (recovery p1)"']  # a quote cannot end the value early

"""Build a BIOS-bootable raw disk: MBR + one ext3 partition holding the Debian kernel, its initrd and a
busybox root whose init prints a banner on the serial console, writes a marker file, and powers off.

Built once per set of inputs and cached: the result is keyed by a hash of the kernel, initrd, busybox and
this recipe. Needs root (a loop device for extlinux) and Debian's busybox-static, syslinux, extlinux,
e2fsprogs, fdisk and linux-image-amd64.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.atomicfile import fsync_dir
from appliance.errors import BootbackError

LABEL = "bootroot"
PART_OFFSET = 1 << 20
MARKER = "/var/bootback-marker"
BANNER = "bootback-demo: booted"
MARKER_LINE = "bootback-demo: marker written"
APPEND = f"root=LABEL={LABEL} rw console=ttyS0 panic=-1 quiet init=/sbin/init"
RECIPE_VERSION = "2"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -o remount,rw /
echo "{BANNER} kernel $(uname -r)"
n=$(($(cat {MARKER} 2>/dev/null | wc -l) + 1))
echo "boot $n $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> {MARKER}
sync
echo "{MARKER_LINE}: boot $n"
poweroff -f
"""

VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "{name}"
guestOS = "debian12-64"
memSize = "512"
numvcpus = "1"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "{disk}"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
serial0.present = "TRUE"
"""


class DemoBuildError(BootbackError):
    exit_code = 60


@dataclass
class BootDisk:
    path: Path
    size: int
    partition_offset: int = PART_OFFSET


def _tools() -> dict[str, str]:
    need = {
        "busybox": "/bin/busybox",
        "mbr": "/usr/lib/syslinux/mbr/mbr.bin",
    }
    missing = [f"{k} ({v})" for k, v in need.items() if not os.path.exists(v)]
    for tool in ("sfdisk", "mkfs.ext3", "extlinux", "losetup", "mount"):
        path = shutil.which(tool) or (f"/sbin/{tool}" if os.path.exists(f"/sbin/{tool}") else None)
        if path is None:
            missing.append(tool)
        need[tool] = path or tool
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        missing.append("a kernel in /boot (linux-image-amd64)")
    else:
        need["kernel"] = kernels[-1]
        need["initrd"] = kernels[-1].replace("vmlinuz", "initrd.img")
    if missing:
        raise DemoBuildError(
            "cannot build the demo VM disk, missing: "
            + ", ".join(missing)
            + " (install busybox-static syslinux extlinux e2fsprogs fdisk linux-image-amd64)"
        )
    if os.geteuid() != 0:
        raise DemoBuildError("building the demo VM disk needs root (extlinux is installed through a loop device)")
    return need


def _key(tools: dict[str, str], size_mib: int, init: str, append: str) -> str:
    variant = "" if append == APPEND else f":{append}"  # the demo's own key unchanged: its cached disk stays valid
    h = hashlib.sha256(f"{RECIPE_VERSION}:{size_mib}:{init}{variant}".encode())
    for k in ("kernel", "initrd", "busybox"):
        st = os.stat(tools[k])
        h.update(f"{tools[k]}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_boot_disk(
    cache_dir: Path, size_mib: int = 96, init: str = INIT, initrd: Path | None = None, append: str = APPEND
) -> BootDisk:
    """The demo boot disk, built into ``cache_dir`` unless an identical one is there already. Variants (the
    virtual lab's test guests): another ``init`` script, another ``initrd`` (keyed by its content) and kernel
    command line."""
    tools = _tools()
    if initrd is not None:
        tools["initrd"] = str(initrd)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"bootdisk-{_key(tools, size_mib, init, append)}.raw"
    if out.exists():
        return BootDisk(out, out.stat().st_size)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmpdir = Path(tmp)
        root = tmpdir / "root"
        for sub in ("bin", "sbin", "proc", "sys", "dev", "run", "var", "tmp", "boot/extlinux", "mnt"):
            (root / sub).mkdir(parents=True)
        shutil.copy(tools["busybox"], root / "bin" / "busybox")
        (root / "sbin" / "init").write_text(init)
        os.chmod(root / "sbin" / "init", 0o755)
        shutil.copy(tools["kernel"], root / "boot" / "vmlinuz")
        shutil.copy(tools["initrd"], root / "boot" / "initrd.img")
        (root / "boot" / "extlinux" / "extlinux.conf").write_text(
            "DEFAULT linux\nTIMEOUT 1\nPROMPT 0\nLABEL linux\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n"
            f"  APPEND {append}\n"
        )
        img = tmpdir / "disk.raw"
        size = size_mib << 20
        with open(img, "wb") as f:
            f.truncate(size)
        run = _runner()
        run([tools["sfdisk"], "--quiet", str(img)], input=f"start={PART_OFFSET // 512}, type=83, bootable\n")
        blocks = (size - PART_OFFSET) // 1024
        run(
            [
                tools["mkfs.ext3"],
                "-q",
                "-F",
                "-L",
                LABEL,
                "-b",
                "1024",
                "-d",
                str(root),
                "-E",
                f"offset={PART_OFFSET}",
                str(img),
                str(blocks),
            ]
        )
        with open(tools["mbr"], "rb") as f:
            mbr = f.read(440)
        with open(img, "r+b") as f:
            f.write(mbr)
        loop = run([tools["losetup"], "-f", "--show", "-o", str(PART_OFFSET), str(img)]).strip()
        mnt = tmpdir / "mnt"
        mnt.mkdir()
        try:
            run([tools["mount"], loop, str(mnt)])
            try:
                run([tools["extlinux"], "--install", str(mnt / "boot" / "extlinux")])
            finally:
                run(["umount", str(mnt)])
        finally:
            run([tools["losetup"], "-d", loop])
        # Built by external tools, so not write_atomic; the same order: data durable, rename, directory durable,
        # or a crash could leave a cached name over a partial image that later runs would trust.
        fd = os.open(img, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(img, out)
        fsync_dir(cache_dir)
    return BootDisk(out, out.stat().st_size)


def _runner():
    def run(cmd: list[str], input: str | None = None) -> str:  # noqa: A002
        p = subprocess.run(cmd, input=input, capture_output=True, text=True)
        if p.returncode != 0:
            raise DemoBuildError(f"building the demo disk: {' '.join(cmd)} failed: {p.stderr.strip()}")
        return p.stdout

    return run


def demo_vmx(name: str, disk: str) -> str:
    return VMX.format(name=name, disk=disk)


def read_marker(disk_image: Path, offset: int = PART_OFFSET) -> str | None:
    """The marker file's content inside a disk image (no boot needed), None if absent."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        with open(disk_image, "rb") as src, open(part, "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(src, dst, 1 << 20)
        p = subprocess.run(["debugfs", "-R", f"cat {MARKER}", str(part)], capture_output=True, text=True)
        if p.returncode != 0 or "File not found" in p.stderr or not p.stdout:
            return None
        return p.stdout

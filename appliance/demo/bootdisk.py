"""Build a BIOS-bootable raw disk: MBR, a FAT boot partition holding syslinux, the Debian kernel and its initrd,
and an ext3 root partition holding a busybox root whose init prints a banner on the serial console, writes a
marker file, and powers off.

Built once per set of inputs and cached: the result is keyed by a hash of the kernel, initrd, busybox and
this recipe. Every step writes into the image file itself (mkfs.fat/mkfs.ext3 at an offset, mtools' mcopy,
syslinux --offset), so no loop device, mount or root is needed: the disk builds inside an unprivileged
`docker build` too (the appliance image ships the same demo as `./run demo`). Needs Debian's busybox-static,
syslinux, syslinux-common, mtools, dosfstools, e2fsprogs, fdisk and linux-image-amd64.
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
PART_OFFSET = 1 << 20  # the boot partition's; the root partition follows it
MIN_ROOT_MIB = 4
MARKER = "/var/bootback-marker"
BANNER = "bootback-demo: booted"
MARKER_LINE = "bootback-demo: marker written"
APPEND = f"root=LABEL={LABEL} rw console=ttyS0 panic=-1 quiet init=/sbin/init"
RECIPE_VERSION = "3"  # 3: FAT boot partition with syslinux (no loop device)

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
    partition_offset: int  # the root partition's (where the marker file lives)


def _tools() -> dict[str, str]:
    need = {
        "busybox": "/bin/busybox",
        "mbr": "/usr/lib/syslinux/mbr/mbr.bin",
    }
    missing = [f"{k} ({v})" for k, v in need.items() if not os.path.exists(v)]
    for tool in ("sfdisk", "mkfs.ext3", "mkfs.fat", "mcopy", "syslinux"):
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
            + " (install busybox-static syslinux syslinux-common mtools dosfstools e2fsprogs fdisk linux-image-amd64)"
        )
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
        return BootDisk(out, out.stat().st_size, root_partition_offset(out))
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmpdir = Path(tmp)
        root = tmpdir / "root"
        for sub in ("bin", "sbin", "proc", "sys", "dev", "run", "var", "tmp", "boot", "mnt"):
            (root / sub).mkdir(parents=True)
        shutil.copy(tools["busybox"], root / "bin" / "busybox")
        (root / "sbin" / "init").write_text(init)
        os.chmod(root / "sbin" / "init", 0o755)
        conf = tmpdir / "syslinux.cfg"
        conf.write_text(
            "DEFAULT linux\nTIMEOUT 1\nPROMPT 0\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n"
            f"  APPEND {append}\n"
        )
        payload = os.path.getsize(tools["kernel"]) + os.path.getsize(tools["initrd"])
        boot_mib = -(-payload // (1 << 20)) + 4  # FAT metadata and slack
        root_mib = size_mib - PART_OFFSET // (1 << 20) - boot_mib
        if root_mib < MIN_ROOT_MIB:
            raise DemoBuildError(
                f"demo disk of {size_mib} MiB: kernel and initrd take {boot_mib} MiB, leaving {root_mib} MiB for "
                f"the root partition (at least {MIN_ROOT_MIB})"
            )
        root_offset = PART_OFFSET + (boot_mib << 20)
        img = tmpdir / "disk.raw"
        size = size_mib << 20
        with open(img, "wb") as f:
            f.truncate(size)
        run = _runner()
        table = (
            f"start={PART_OFFSET // 512}, size={(boot_mib << 20) // 512}, type=6, bootable\n"
            f"start={root_offset // 512}, type=83\n"
        )
        run([tools["sfdisk"], "--quiet", str(img)], input=table)
        boot = f"{img}@@{PART_OFFSET}"  # mtools' image@@offset: the FAT partition inside the disk
        run(
            [
                tools["mkfs.fat"],
                "-F",
                "16",
                "-n",
                "BOOT",
                "--offset",
                str(PART_OFFSET // 512),
                str(img),
                str(boot_mib << 10),
            ]
        )
        for src, name in ((tools["kernel"], "vmlinuz"), (tools["initrd"], "initrd.img"), (conf, "syslinux.cfg")):
            run([tools["mcopy"], "-i", boot, str(src), f"::/{name}"])
        run([tools["syslinux"], "--offset", str(PART_OFFSET), "--install", str(img)])
        blocks = (size - root_offset) // 1024
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
                f"offset={root_offset}",
                str(img),
                str(blocks),
            ]
        )
        with open(tools["mbr"], "rb") as f:
            mbr = f.read(440)
        with open(img, "r+b") as f:
            f.write(mbr)
        # Built by external tools, so not write_atomic; the same order: data durable, rename, directory durable,
        # or a crash could leave a cached name over a partial image that later runs would trust.
        fd = os.open(img, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(img, out)
        fsync_dir(cache_dir)
    return BootDisk(out, out.stat().st_size, root_partition_offset(out))


def root_partition_offset(disk_image: Path) -> int:
    """Where the root (second) partition starts, from the disk's MBR partition table."""
    with open(disk_image, "rb") as f:
        mbr = f.read(512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise DemoBuildError(f"{disk_image}: no MBR partition table")
    return int.from_bytes(mbr[446 + 16 + 8 : 446 + 16 + 12], "little") * 512


def _runner():
    def run(cmd: list[str], input: str | None = None) -> str:  # noqa: A002
        p = subprocess.run(cmd, input=input, capture_output=True, text=True)
        if p.returncode != 0:
            raise DemoBuildError(f"building the demo disk: {' '.join(cmd)} failed: {p.stderr.strip()}")
        return p.stdout

    return run


def demo_vmx(name: str, disk: str) -> str:
    return VMX.format(name=name, disk=disk)


def read_marker(disk_image: Path, offset: int | None = None) -> str | None:
    """The marker file's content inside a disk image (no boot needed), None if absent. ``offset``: the root
    partition's, read from the partition table when not given."""
    if offset is None:
        offset = root_partition_offset(disk_image)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        with open(disk_image, "rb") as src, open(part, "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(src, dst, 1 << 20)
        p = subprocess.run(["debugfs", "-R", f"cat {MARKER}", str(part)], capture_output=True, text=True)
        if p.returncode != 0 or "File not found" in p.stderr or not p.stdout:
            return None
        return p.stdout

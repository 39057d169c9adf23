"""The embedded demo: a local repository holding a small VM with two restore points, ready to serve.

Beside it, where the VM boots, the two VMs and the application group of the demo's virtual lab
(appliance.demo.lab). The VM is the bootable demo disk (appliance.demo.bootdisk) when this machine can build it
(root, Debian's kernel, busybox-static, syslinux); otherwise a data disk with an ext4 file system, so the demo
still runs anywhere Python does. The second restore point changes a little, to show incremental backups.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.demo.bootdisk import DemoBuildError, build_boot_disk, demo_vmx
from appliance.demo.lab import prepare_demo_lab
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import open_source
from appliance.repo import Repository

log = logging.getLogger("bootback.demo")
VM = "demo-vm"


@dataclass
class Demo:
    repo: Path
    state: Path
    bootable: bool
    points: int
    lab: bool = False  # the demo-lab group and its VMs are there (appliance.demo.lab)


def prepare_demo(data_dir: Path) -> Demo:
    """Create (once) DATA_DIR/repo with the demo VM; later runs reuse it."""
    data_dir = Path(data_dir).resolve()
    repo_path = data_dir / "repo"
    build_cache = Path(os.environ.get("BOOTBACK_BUILD_CACHE", data_dir / "build-cache"))
    if Repository.is_repository(repo_path):
        repo = Repository.open(repo_path)
        points = repo.restore_points(VM)
        if points:
            bootable = points[-1].source.get("bootable", False)
            lab = bootable and prepare_demo_lab(repo, data_dir / "state", build_cache)
            return Demo(repo_path, data_dir / "state", bootable, len(points), lab)
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = Repository.open(repo_path) if Repository.is_repository(repo_path) else Repository.init(repo_path)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        vmdir = Path(tmp) / VM
        vmdir.mkdir()
        disk = vmdir / f"{VM}.img"
        bootable = _make_disk(disk, build_cache)
        (vmdir / f"{VM}.vmx").write_text(demo_vmx(VM, disk.name))
        vmx = (vmdir / f"{VM}.vmx").read_text()
        for _ in range(2):
            source = open_source(disk)
            try:
                backup_vm(repo, VM, [source], vmx, {"bootable": bootable, "demo": True})
            finally:
                source.close()
            _touch_a_little(disk)
    lab = bootable and prepare_demo_lab(repo, data_dir / "state", build_cache)
    return Demo(repo_path, data_dir / "state", bootable, len(repo.restore_points(VM)), lab)


def _make_disk(disk: Path, build_cache: Path) -> bool:
    try:
        built = build_boot_disk(build_cache)
        shutil.copyfile(built.path, disk)
        return True
    except (DemoBuildError, OSError) as exc:
        log.warning("demo: no bootable disk (%s); using a data disk instead", exc)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text(f"{VM}\n")
        (root / "README.txt").write_text("A bootback demo disk: browse it with file-level recovery.\n")
        (root / "data.bin").write_bytes(os.urandom(8 << 20))
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
        if os.path.exists(mkfs):
            subprocess.run(
                [mkfs, "-q", "-F", "-L", "demo", "-d", str(root), str(disk)], check=True, capture_output=True
            )
        else:  # no e2fsprogs: still a disk with data and holes
            with open(disk, "r+b") as f:
                f.write((root / "data.bin").read_bytes())
    return False


def _touch_a_little(disk: Path) -> None:
    """Change one 64 KiB region near the end, as a day of work on a VM would (a few chunks, not the disk)."""
    size = disk.stat().st_size
    with open(disk, "r+b") as f:
        f.seek(size - (4 << 20))
        f.write(os.urandom(64 << 10))

"""The Linux kernel's NFS client, in a Debian kernel booted under qemu (TCG), uses our export as its root
file system: it boots from it, reads, writes, renames and deletes files, and the host checks the result."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.nfsd_process import NfsdProcess

KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
echo "guest: mounted $(grep ' / ' /proc/mounts | head -n1)"
echo "guest: in.txt says: $(cat /data/in.txt)"
echo "guest: big.bin sha256 $(sha256sum /data/big.bin | cut -d' ' -f1)"
echo "written by the kernel client" > /data/out.txt
dd if=/dev/zero bs=1024 count=3000 2>/dev/null | tr '\\000' 'k' > /data/kfile.bin
mkdir /data/newdir && mv /data/out.txt /data/newdir/moved.txt
rm /data/delete-me.txt
ln -s newdir/moved.txt /data/link
echo "guest: link reads: $(cat /data/link)"
sync
echo "guest: done"
poweroff -f
"""


@pytest.mark.slow
@pytest.mark.skipif(not KERNELS or not shutil.which("qemu-system-x86_64"), reason="needs linux-image-amd64 + qemu")
def test_kernel_nfs_client_boots_reads_and_writes(tmp_path: Path, artifacts_dir: Path) -> None:
    kernel = KERNELS[-1]
    initrd = kernel.replace("vmlinuz", "initrd.img")
    root = tmp_path / "guestroot"
    for sub in ("bin", "sbin", "proc", "dev", "data", "sys", "tmp"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "sbin" / "init").write_text(INIT)
    os.chmod(root / "sbin" / "init", 0o755)
    (root / "data" / "in.txt").write_text("hello kernel")
    big = os.urandom(5 * 1024 * 1024 + 77)
    (root / "data" / "big.bin").write_bytes(big)
    (root / "data" / "delete-me.txt").write_text("bye")
    console = artifacts_dir / "kernel-nfs-client-console.log"
    with NfsdProcess(root) as srv:
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            f"file:{console}",
            "-kernel",
            kernel,
            "-initrd",
            initrd,
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-append",
            f"console=ttyS0 panic=-1 root=/dev/nfs nfsroot=10.0.2.2:{root},vers=3,tcp,nolock "
            "ip=dhcp rw init=/sbin/init quiet",
        ]
        subprocess.run(cmd, timeout=300, check=False)
        log = srv.log()
    text = console.read_text(errors="replace")
    assert "guest: done" in text, f"guest did not finish; console:\n{text[-3000:]}\nnfsd:\n{log[-2000:]}"
    assert "nfs" in text.split("guest: mounted", 1)[1].split("\n", 1)[0]
    assert "guest: in.txt says: hello kernel" in text
    assert f"guest: big.bin sha256 {hashlib.sha256(big).hexdigest()}" in text
    assert "guest: link reads: written by the kernel client" in text
    assert (root / "data" / "newdir" / "moved.txt").read_text() == "written by the kernel client\n"
    assert (root / "data" / "kfile.bin").read_bytes() == b"k" * 3_072_000
    assert not (root / "data" / "delete-me.txt").exists()
    assert os.readlink(root / "data" / "link") == "newdir/moved.txt"

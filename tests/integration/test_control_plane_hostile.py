"""A hostile caller against the real daemon's control plane: migration outputs outside the allowed directories,
through links, over existing files; a symlink planted over NFS; catastrophic verification patterns; huge
WRITE/SETATTR sizes; floods of sessions. Everything is refused quickly and the daemon keeps answering."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest

from appliance.errors import (
    LimitExceededError,
    OutputExistsError,
    PathNotAllowedError,
    UsageError,
)
from appliance.sessions.control import ControlClient
from nfsd.xdr import Packer
from tests.daemon_process import DaemonProcess, bootback
from tests.nfsd_process import PRIVATE_PORTS
from tests.rpcclient import NfsDir

MiB = 1 << 20
NFS3ERR_FBIG = 27
CANARY = b"canary bytes that live outside the session folder\n"

# A boot sector that prints a 60-byte line to COM1 2000 times (120 KB of console), then halts.
BOOT_SECTOR = """
.code16
.globl _start
_start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov $0x3f8, %dx
  mov $2000, %cx
outer:
  mov $msg, %si
inner:
  lodsb
  test %al, %al
  jz next
  out %al, %dx
  jmp inner
next:
  loop outer
halt:
  hlt
  jmp halt
msg: .asciz "bootback hostile console line, no pattern here 0123456789\\r\\n"
.org 510
.word 0xaa55
"""


def boot_disk(base: Path, source: str = BOOT_SECTOR, name: str = "chatty") -> Path:
    """A 1 MiB raw disk whose boot sector is ``source`` (GNU as, 16-bit)."""
    src, obj, sector = base / f"{name}.S", base / f"{name}.o", base / f"{name}.bin"
    src.write_text(source)
    subprocess.run(["as", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(sector), str(obj)], check=True
    )
    disk = base / f"{name}.raw"
    disk.write_bytes(sector.read_bytes().ljust(MiB, b"\0"))
    return disk


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    rnd = random.Random(8)
    path = base / "repo"
    bootback("init", path)
    for vm in ("app01", "app02"):
        (base / f"{vm}.raw").write_bytes(rnd.randbytes(2 * MiB))
        bootback("backup", path, "--vm", vm, base / f"{vm}.raw")
    bootback("backup", path, "--vm", "chatty", boot_disk(base))
    return path


class Appliance:
    """A daemon whose state sits alone in its own folder, with one allowed migration directory beside it and
    an 'outside' directory that nothing may reach."""

    def __init__(self, repo: Path, base: Path, *args: str) -> None:
        self.migrations, self.outside = base / "migrations", base / "outside"
        self.migrations.mkdir(parents=True)
        self.outside.mkdir()
        self.daemon = DaemonProcess(
            repo, base / "st" / "state", *PRIVATE_PORTS, "--migration-dir", str(self.migrations), *args
        ).start()
        self.client = ControlClient(self.daemon.state, timeout=30)

    def call(self, op: str, **params: object) -> object:
        return self.client.call(op, **params)

    def nfs(self, doc: dict) -> NfsDir:
        ports = self.call("status")["ports"]
        return NfsDir(ports["mount"], ports["nfs"], doc["path"])

    def wait_migrated(self, sid: str) -> dict:
        deadline = time.monotonic() + 30
        while (status := self.call("migrate_status", id=sid))["running"]:
            assert time.monotonic() < deadline, "migration did not finish"
            time.sleep(0.05)
        return status


@pytest.fixture
def appliance(repo: Path, tmp_path: Path):
    a = Appliance(repo, tmp_path)
    yield a
    a.daemon.stop()


def extent_of(doc: dict) -> str:
    return doc["disks"][0]["extent"]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_migration_outputs_stay_under_the_allowed_directories(appliance: Appliance) -> None:
    (doc,) = appliance.call("publish", vm="app01")
    sid, mig, outside = doc["id"], appliance.migrations, appliance.outside
    for output in (str(outside / "disk.raw"), "/etc/bootback-owned.raw", f"{mig}/../outside/disk.raw"):
        with pytest.raises(PathNotAllowedError, match="outside the allowed directories|'..' is not allowed"):
            appliance.call("migrate", id=sid, output=output)
    # a link inside the allowed directory leads outside: never followed, whether a parent or the output itself
    (mig / "escape").symlink_to(outside)
    with pytest.raises(PathNotAllowedError, match="symbolic link"):
        appliance.call("migrate", id=sid, output=str(mig / "escape" / "disk.raw"))
    with pytest.raises(PathNotAllowedError, match="symbolic link"):
        appliance.call("migrate", id=sid, output=str(mig / "escape" / "sub" / "disk.raw"))
    assert list(outside.iterdir()) == [], "nothing may appear outside the allowed directories"
    # an existing file is kept unless the caller asks to overwrite it
    existing = mig / "existing.raw"
    existing.write_bytes(b"operator's file")
    with pytest.raises(OutputExistsError, match="exists; ask for overwrite"):
        appliance.call("migrate", id=sid, output=str(existing))
    assert existing.read_bytes() == b"operator's file"
    appliance.call("migrate", id=sid, output=str(existing), overwrite=True)
    assert appliance.wait_migrated(sid)["error"] is None
    assert existing.stat().st_size == doc["disks"][0]["size"] and mode_of(existing) == 0o600
    # a link at the output's own name is replaced by the file, its target untouched
    (outside / "target.raw").write_bytes(b"not yours")
    (mig / "linked.raw").symlink_to(outside / "target.raw")
    with pytest.raises(OutputExistsError):
        appliance.call("migrate", id=sid, output=str(mig / "linked.raw"))
    appliance.call("migrate", id=sid, output=str(mig / "linked.raw"), overwrite=True)
    assert appliance.wait_migrated(sid)["error"] is None
    assert not (mig / "linked.raw").is_symlink() and (outside / "target.raw").read_bytes() == b"not yours"
    # a new file in a new directory: private to the daemon
    appliance.call("migrate", id=sid, output=str(mig / "new" / "deeper" / "disk.raw"))
    assert appliance.wait_migrated(sid)["error"] is None
    assert mode_of(mig / "new" / "deeper" / "disk.raw") == 0o600
    assert mode_of(mig / "new") == 0o700 and mode_of(mig / "new" / "deeper") == 0o700


def nfs_symlink(nfs: NfsDir, name: str, target: str) -> int:
    no_attrs = Packer().bool(False).bool(False).bool(False).bool(False).u32(0).u32(0).bytes()
    args = Packer().opaque(nfs.dir).string(name).bytes() + no_attrs + Packer().string(target).bytes()
    return nfs.nfs.call(100003, 3, 10, args).u32()


def test_folder_migration_copies_a_planted_link_as_a_link_never_its_target(appliance: Appliance) -> None:
    canary = appliance.outside / "canary"
    canary.write_bytes(CANARY)
    (doc,) = appliance.call("publish", vm="app01")
    assert nfs_symlink(appliance.nfs(doc), "leak.nvram", str(canary)) == 0
    out = appliance.migrations / "web01"
    appliance.call("migrate", id=doc["id"], output=str(out))
    assert appliance.wait_migrated(doc["id"])["error"] is None
    assert (out / "leak.nvram").is_symlink() and os.readlink(out / "leak.nvram") == str(canary)
    copied = {p.name: p for p in out.iterdir()}
    assert extent_of(doc) in copied and "app01.vmx" in copied
    for p in copied.values():
        if not p.is_symlink():
            assert CANARY not in p.read_bytes(), f"{p.name} holds the canary's bytes"
            assert mode_of(p) == 0o600
    assert mode_of(out) == 0o700


def test_publish_caches_only_under_the_cache_directories_and_private(appliance: Appliance) -> None:
    with pytest.raises(PathNotAllowedError, match="outside the allowed directories"):
        appliance.call("publish", vm="app01", cache=str(appliance.outside))
    assert list(appliance.outside.iterdir()) == []
    (doc,) = appliance.call("publish", vm="app01")
    cache = Path(doc["cache_dir"])
    assert mode_of(cache.parent) == 0o700 and mode_of(cache) == 0o700
    # the write cache and the folder's files are the daemon's alone (names.json is datastore/folder.py's)
    for path in [*cache.glob("disks/*"), *cache.glob("files/*"), cache / "disks", cache / "files"]:
        assert mode_of(path) == (0o700 if path.is_dir() else 0o600), path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def nfs_setattr_size(nfs: NfsDir, fh: bytes, size: int) -> int:
    args = Packer().opaque(fh).bool(False).bool(False).bool(False).bool(True).u64(size).u32(0).u32(0).bool(False)
    return nfs.nfs.call(100003, 3, 2, args.bytes()).u32()


def timed_listing(appliance: Appliance) -> float:
    start = time.monotonic()
    appliance.call("sessions")
    return time.monotonic() - start


def test_huge_sizes_are_refused_before_anything_is_allocated(appliance: Appliance) -> None:
    (doc,) = appliance.call("publish", vm="app01")
    nfs = appliance.nfs(doc)
    fh = nfs.lookup(extent_of(doc))
    pid = appliance.daemon.proc.pid
    before = rss_bytes(pid)
    start = time.monotonic()
    assert nfs.write(fh, 1 << 46, b"x" * 4096) == NFS3ERR_FBIG
    assert nfs_setattr_size(nfs, fh, 8 << 40) == NFS3ERR_FBIG
    assert nfs_setattr_size(nfs, fh, 3 * doc["disks"][0]["size"]) == NFS3ERR_FBIG  # past twice its size
    assert time.monotonic() - start < 1.0
    assert rss_bytes(pid) - before < 16 * MiB
    assert timed_listing(appliance) < 1.0
    # growing within the bound still works, and a real write lands
    assert nfs_setattr_size(nfs, fh, doc["disks"][0]["size"] + MiB) == 0
    assert nfs.write(fh, doc["disks"][0]["size"], b"grown") == 0
    assert nfs.read(fh, doc["disks"][0]["size"], 5) == b"grown"
    (listed,) = appliance.call("sessions")
    assert listed["changed_bytes"] == 4096  # one 4 KiB sector of a block written, counted without scanning the map


def test_session_caps_per_request_and_in_total(repo: Path, tmp_path: Path) -> None:
    a = Appliance(repo, tmp_path, "--max-sessions", "3", "--max-publish", "2")
    try:
        with pytest.raises(LimitExceededError, match=r"3 VMs in one request, at most 2 \(--max-publish\)"):
            a.call("publish", vms=["app01", "app02", "app01"], mode="sandbox")
        with pytest.raises(LimitExceededError, match="at most 2"):
            a.call("publish", vms=["app01"] * 500, mode="sandbox")
        assert a.call("status")["sessions"] == 0, "a refused request publishes nothing"
        a.call("publish", vms=["app01", "app02"], mode="sandbox")
        with pytest.raises(LimitExceededError, match=r"2 sessions run and 2 more were asked for: at most 3"):
            a.call("publish", vms=["app01", "app02"], mode="sandbox")
        a.call("publish", vm="app01", mode="sandbox")
        with pytest.raises(LimitExceededError, match="at most 3 run at once"):
            a.call("publish", vm="app02", mode="sandbox")
        assert a.call("status")["sessions"] == 3
        with pytest.raises(UsageError, match="'vms' is a list of VM names"):
            a.call("publish", vms="app01")
    finally:
        a.daemon.stop()


def test_slots_are_never_reused_even_without_the_counter_file(appliance: Appliance) -> None:
    (first,) = appliance.call("publish", vm="app01", mode="sandbox")
    (appliance.daemon.state / "next-slot").unlink()
    (second,) = appliance.call("publish", vm="app02", mode="sandbox")
    assert second["slot"] != first["slot"]
    assert appliance.nfs(first).lookup(extent_of(first)), "the first session is still on the datastore"
    assert mode_of(appliance.daemon.state / "next-slot") == 0o600


def test_a_bug_inside_an_operation_is_not_called_bad_parameters(appliance: Appliance) -> None:
    with pytest.raises(UsageError, match="bad parameters for session"):
        appliance.call("session", bogus=1)
    (doc,) = appliance.call("publish", vm="app01", mode="sandbox")
    # a wrongly typed id reaches code that fails inside: a daemon failure, reported as such
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is the point of the assertion below
        appliance.call("session", id=5)
    assert type(info.value).__name__ == "BootbackError" and "bad parameters" not in str(info.value)
    assert appliance.call("session", id=doc["id"])["id"] == doc["id"]


def test_status_says_whether_nfs_is_open_to_everyone(repo: Path, tmp_path: Path) -> None:
    a = Appliance(repo, tmp_path / "open")
    try:
        status = a.call("status")
        assert status["nfs_open_to_everyone"] is True and status["nfs_clients"] == ["0.0.0.0/0", "::/0"]
        warning = next(line for line in a.daemon.log().splitlines() if "is open to every address" in line)
        assert " WARNING " in warning and "BOOTBACK_CLIENTS" in warning
    finally:
        a.daemon.stop()
    b = Appliance(repo, tmp_path / "closed", "--clients", "127.0.0.0/8")
    try:
        status = b.call("status")
        assert status["nfs_open_to_everyone"] is False and status["nfs_clients"] == ["127.0.0.0/8"]
        assert "is open to every address" not in b.daemon.log()
    finally:
        b.daemon.stop()


@pytest.mark.slow
def test_a_catastrophic_pattern_does_not_freeze_the_daemon_and_verifications_are_capped(
    repo: Path, tmp_path: Path
) -> None:
    # the guest boots over nfs:// (qemu asks the portmapper on 111), so this daemon has the default portmapper
    a = Appliance(repo, tmp_path, "--bind", "127.0.0.1", "--portmap-port", "111")
    try:
        with pytest.raises(UsageError, match="RE2 accepts"):
            a.call("verify", vm="chatty", expect=r"(a)\1")
        with pytest.raises(UsageError, match="at most 1000 characters"):
            a.call("verify", vm="chatty", expect="a" * 1001)
        with pytest.raises(UsageError, match="memory_mib: between 128 and 4096"):
            a.call("verify", vm="chatty", memory_mib=65536)
        # 20 s: two TCG guests boot at once and must print before their pattern times out, on a busy machine too
        jobs = [a.call("verify", vm="chatty", expect="(.|.)*XYZ", timeout=20) for _ in range(2)]
        with pytest.raises(LimitExceededError, match="2 verifications are running"):
            a.call("verify", vm="chatty", timeout=10)
        slowest = 0.0
        while any(a.call("verification", id=j["id"])["state"] == "running" for j in jobs):
            start = time.monotonic()
            a.call("status")
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
        assert slowest < 1.0, f"status took {slowest:.1f} s during a verification"
        for job in jobs:
            done = a.call("verification", id=job["id"])
            assert done["state"] == "failed", done
            report = done["report"]
            assert report["matched"] is False and report["first_console_line_seconds"] is not None, str(report)
            assert "bootback hostile console line" in report["console_tail"]
        # the console was long enough that a backtracking engine would never have finished
        assert len((a.daemon.state / "verifications" / f"{jobs[0]['id']}.console").read_bytes()) > 10_000
    finally:
        a.daemon.stop()


@pytest.mark.slow
def test_a_guest_that_floods_its_console_is_stopped_at_the_cap(tmp_path: Path) -> None:
    from appliance.demo.qemu import boot

    disk = boot_disk(tmp_path, BOOT_SECTOR.replace("  loop outer", "  jmp outer"), "flood")  # prints forever
    log = tmp_path / "console"
    result = boot(str(disk), timeout=60, console_log=log, memory_mib=128, max_console_bytes=20_000)
    assert result.seconds < 30, "the guest was not stopped when its console passed the cap"
    assert 0 < log.stat().st_size <= 20_000 and len(result.console.encode()) <= 20_000 + 1000

"""Boot a disk (a local file or an nfs:// URL) with qemu-system-x86_64 and read its console.

The accelerator: KVM when ``/dev/kvm`` opens read-write and a probe guest runs on it, else TCG (pure
emulation, slower but works anywhere, also in a container without ``--device /dev/kvm``). ``BOOTBACK_QEMU_ACCEL``
forces one (``kvm`` or ``tcg``; default ``auto``). KVM can be present and still fail on real guests (nested
virtualisation that cannot emulate a bootloader's mode switch: "KVM internal error", the guest then hangs
paused), so in ``auto`` such a boot is retried once under TCG and KVM is not used again by this process.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.demo.bootdisk import BANNER, MARKER_LINE
from appliance.errors import UsageError

log = logging.getLogger("bootback.qemu")
ACCEL_ENV = "BOOTBACK_QEMU_ACCEL"
ACCELS = ("auto", "kvm", "tcg")
KVM_DEVICE = "/dev/kvm"
# SeaBIOS runs to its boot attempt in under a second under TCG and faster on a working KVM; this machine's nested
# KVM takes 5-20 s (and then fails on the bootloader): such a KVM is not worth using.
PROBE_SECONDS = 10
KVM_FAILED = "KVM internal error"  # what qemu prints when KVM cannot run the guest (it then stops, paused)
_verdicts: dict[str, bool] = {}  # device -> usable, probed once per process
_verdict_lock = threading.Lock()


@dataclass
class BootResult:
    console: str
    seconds: float
    first_line_seconds: float | None
    returncode: int
    accel: str = "tcg"

    @property
    def booted(self) -> bool:
        return BANNER in self.console

    @property
    def marker_written(self) -> bool:
        return MARKER_LINE in self.console


def accel_setting(value: str | None = None) -> str:
    """The configured accelerator (argument, else ``BOOTBACK_QEMU_ACCEL``, else ``auto``), checked."""
    setting = (value if value is not None else os.environ.get(ACCEL_ENV, "auto")).strip().lower() or "auto"
    if setting not in ACCELS:
        raise UsageError(f"{ACCEL_ENV}: one of {', '.join(ACCELS)}, got {setting!r}")
    return setting


def kvm_usable(device: str = KVM_DEVICE) -> bool:
    """True when ``device`` opens read-write (passed into the container, and we are allowed to use it) and a
    probe guest (SeaBIOS, no disk) runs to its boot attempt under KVM within PROBE_SECONDS. Probed once per
    device and process."""
    with _verdict_lock:
        if device not in _verdicts:
            _verdicts[device] = _probe_kvm(device)
        return _verdicts[device]


def _probe_kvm(device: str) -> bool:
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        log.info("qemu: no KVM (%s: %s): using TCG", device, exc.strerror)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bios.log"
        cmd = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "16", "-nodefaults"]
        cmd += ["-display", "none", "-no-reboot", "-monitor", "none", "-serial", "none"]
        cmd += ["-debugcon", f"file:{out}", "-global", "isa-debugcon.iobase=0x402"]  # SeaBIOS' debug port
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, ran = time.monotonic() + PROBE_SECONDS, False
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and b"Booting from" in out.read_bytes():
                    ran = True
                    break
                time.sleep(0.1)
        finally:
            _kill(proc)
    log.info("qemu: KVM on %s %s", device, "works" if ran else "does not run a probe guest: using TCG")
    return ran


def _kill(proc: subprocess.Popen) -> None:
    """Stop qemu; a process stuck in the kernel (a hung KVM ioctl) is left to exit later, never waited for."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("qemu: process %d did not exit after SIGKILL", proc.pid)


def boot(
    drive: str | list[str],
    timeout: float = 240,
    console_log: Path | None = None,
    memory_mib: int = 512,
    stop_when: re.Pattern[str] | None = None,
    max_console_bytes: int | None = None,
    accel: str | None = None,
) -> BootResult:
    """Boot ``drive`` (raw; several: the first boots) until the guest powers off or ``timeout`` passes.
    The guest has no network: a recovered VM must not meet production. With ``stop_when``, the guest is
    stopped as soon as its console matches (a verification has seen what it needed). With
    ``max_console_bytes``, a guest that prints more is stopped and its console cut there (a bounded log).
    ``accel``: kvm, tcg or auto (default: ``BOOTBACK_QEMU_ACCEL``, else auto)."""
    setting = accel_setting(accel)
    chosen = "kvm" if setting == "kvm" or (setting == "auto" and kvm_usable()) else "tcg"
    start = time.monotonic()
    result = _boot_once(drive, chosen, timeout, console_log, memory_mib, stop_when, max_console_bytes)
    if chosen == "kvm" and setting == "auto" and KVM_FAILED in result.console:
        log.warning("qemu: KVM cannot run this guest (%s): booting again under TCG", KVM_FAILED)
        with _verdict_lock:
            _verdicts[KVM_DEVICE] = False
        remaining = max(timeout - (time.monotonic() - start), 1.0)
        result = _boot_once(drive, "tcg", remaining, console_log, memory_mib, stop_when, max_console_bytes)
        result.seconds = time.monotonic() - start
    return result


def _boot_once(
    drive: str | list[str],
    accel: str,
    timeout: float,
    console_log: Path | None,
    memory_mib: int,
    stop_when: re.Pattern[str] | None,
    max_console_bytes: int | None,
) -> BootResult:
    drives = [drive] if isinstance(drive, str) else list(drive)
    log_path = Path(console_log) if console_log else Path(tempfile.mkstemp(suffix=".console")[1])
    log_path.write_text("")
    cmd = ["qemu-system-x86_64", "-accel", accel, "-m", str(memory_mib), "-smp", "1", "-display", "none"]
    cmd += ["-no-reboot", "-monitor", "none", "-serial", f"file:{log_path}", "-nic", "none"]
    for d in drives:
        cmd += ["-drive", f"file={d},format=raw,if=virtio,cache=none"]
    start = time.monotonic()
    first: float | None = None
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while proc.poll() is None:
                size = log_path.stat().st_size
                if first is None and size > 0:
                    first = time.monotonic() - start
                if max_console_bytes is not None and size > max_console_bytes:
                    break
                if (
                    stop_when is not None
                    and first is not None
                    and stop_when.search(_console(log_path, max_console_bytes))
                ):
                    break
                if time.monotonic() - start > timeout:
                    break
                if accel == "kvm" and KVM_FAILED in _stderr(err):
                    break  # the guest is stopped for good: no point waiting for the timeout
                time.sleep(0.1)
        finally:
            _kill(proc)
        stderr = _stderr(err)
    if max_console_bytes is not None and log_path.stat().st_size > max_console_bytes:
        os.truncate(log_path, max_console_bytes)
    text = _console(log_path, max_console_bytes)
    if first is None and text:
        first = time.monotonic() - start
    if stderr.strip():
        text += f"\n[qemu stderr] {stderr[:4000]}"
    return BootResult(text, time.monotonic() - start, first, proc.returncode, accel)


def _stderr(f) -> str:  # noqa: ANN001 - a binary temporary file
    f.seek(0)
    return f.read(64 << 10).decode(errors="replace")


def _console(log_path: Path, limit: int | None) -> str:
    with open(log_path, "rb") as f:
        return f.read(-1 if limit is None else limit).decode(errors="replace")

"""Boot a disk (a local file or an nfs:// URL) with qemu-system-x86_64 under TCG and read its console."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.demo.bootdisk import BANNER, MARKER_LINE


@dataclass
class BootResult:
    console: str
    seconds: float
    first_line_seconds: float | None
    returncode: int

    @property
    def booted(self) -> bool:
        return BANNER in self.console

    @property
    def marker_written(self) -> bool:
        return MARKER_LINE in self.console


def boot(
    drive: str | list[str],
    timeout: float = 240,
    console_log: Path | None = None,
    memory_mib: int = 512,
    stop_when: re.Pattern[str] | None = None,
    max_console_bytes: int | None = None,
) -> BootResult:
    """Boot ``drive`` (raw; several: the first boots) until the guest powers off or ``timeout`` passes.
    The guest has no network: a recovered VM must not meet production. With ``stop_when``, the guest is
    stopped as soon as its console matches (a verification has seen what it needed). With
    ``max_console_bytes``, a guest that prints more is stopped and its console cut there (a bounded log)."""
    drives = [drive] if isinstance(drive, str) else list(drive)
    log = Path(console_log) if console_log else Path(tempfile.mkstemp(suffix=".console")[1])
    log.write_text("")
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        f"file:{log}",
        "-nic",
        "none",
    ]
    for d in drives:
        cmd += ["-drive", f"file={d},format=raw,if=virtio,cache=none"]
    start = time.monotonic()
    first: float | None = None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            size = log.stat().st_size
            if first is None and size > 0:
                first = time.monotonic() - start
            if max_console_bytes is not None and size > max_console_bytes:
                proc.kill()
                break
            if stop_when is not None and first is not None and stop_when.search(_console(log, max_console_bytes)):
                proc.kill()
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                break
            time.sleep(0.1)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    if max_console_bytes is not None and log.stat().st_size > max_console_bytes:
        os.truncate(log, max_console_bytes)
    text = _console(log, max_console_bytes)
    if first is None and text:
        first = time.monotonic() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if err.strip():
        text += f"\n[qemu stderr] {err}"
    return BootResult(text, time.monotonic() - start, first, proc.returncode)


def _console(log: Path, limit: int | None) -> str:
    with open(log, "rb") as f:
        return f.read(-1 if limit is None else limit).decode(errors="replace")

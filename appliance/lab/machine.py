"""One lab guest: a qemu process booting published disks over nfs://, its NIC a tap device on the lab's
bridge, its serial console in a file (bounded), and a QMP socket for screenshots and stopping it.

QMP is three JSON lines here (greeting, ``qmp_capabilities``, one command), so a small synchronous client is
written out below rather than pulling in ``qemu.qmp``, whose API is asyncio with a deprecated sync wrapper.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from appliance.demo.qemu import accel_setting
from appliance.errors import BootbackError

MAX_CONSOLE = 1 << 20  # console bytes kept per guest; reading stops there
QMP_TIMEOUT = 10.0


class MachineError(BootbackError):
    """A guest's qemu could not be driven."""


class Machine:
    def __init__(self, name: str, workdir: Path, drives: list[str], tap_fd: int, mac: str, memory_mib: int, nic: str):
        self.name = name
        self.console_log = Path(workdir) / f"{name}.console"
        self.qmp_path = Path(workdir) / f"{name}.qmp"
        self.drives, self.tap_fd, self.mac = drives, tap_fd, mac
        self.memory_mib, self.nic = memory_mib, nic
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        # KVM only when asked for: in "auto", a boot that hits a "KVM internal error" is retried under TCG by
        # appliance.demo.qemu.boot, which a lab's long-running guests on a shared network cannot do.
        self.accel = "kvm" if accel_setting() == "kvm" else "tcg"

    def command(self) -> list[str]:
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            self.accel,
            "-m",
            str(self.memory_mib),
            "-smp",
            "1",
            "-display",
            "none",
            "-vga",
            "std",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console_log}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev",
            f"tap,id=lan,fd={self.tap_fd}",
            "-device",
            f"{self.nic},netdev=lan,mac={self.mac},romfile=",  # no PXE ROM: the guests boot from disk
        ]
        for d in self.drives:
            cmd += ["-drive", f"file={d},format=raw,if=virtio,cache=none"]
        return cmd

    def start(self) -> None:
        self.console_log.write_text("")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.console_log.with_suffix(".qemu.log"), "wb"),  # noqa: SIM115 - the child keeps it
            pass_fds=(self.tap_fd,),
        )
        os.close(self.tap_fd)  # qemu holds the tap now; the lab's copy would keep the device after qemu exits

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console(self) -> str:
        try:
            with open(self.console_log, "rb") as f:
                return f.read(MAX_CONSOLE).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_errors(self) -> str:
        try:
            return self.console_log.with_suffix(".qemu.log").read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on a fresh connection (qemu answers one client at a time; a connection per command
        keeps a stuck guest from holding a socket open)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(QMP_TIMEOUT)
            s.connect(str(self.qmp_path))
            reader = s.makefile("rb")
            json.loads(reader.readline())  # the greeting
            for doc in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                s.sendall(json.dumps(doc).encode() + b"\n")
                while True:
                    line = reader.readline()
                    if not line:
                        raise MachineError(f"{self.name}: qemu closed its QMP socket during {command}")
                    reply = json.loads(line)
                    if "event" in reply:
                        continue
                    if "error" in reply:
                        raise MachineError(f"{self.name}: QMP {command}: {reply['error'].get('desc')}")
                    break
            return reply.get("return")

    def screendump(self, path: Path, fmt: str = "png") -> Path:
        self.qmp("screendump", filename=str(path), format=fmt)
        return path

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()  # a sandbox: nothing of the guest is kept, no clean shutdown to wait for
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

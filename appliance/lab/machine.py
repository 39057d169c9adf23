"""One lab guest: a qemu process booting published disks over nfs://, its NIC a tap device on the lab's
bridge, its serial console in a file, a QMP socket for screenshots, and a virtio-serial channel named
org.qemu.guest_agent.0 where a guest's qemu-guest-agent answers (the "agent" check).

The console is bounded: qemu writes it to a Unix socket this process listens on (qemu connects as the client
when it starts, so nothing is lost), and a reader thread keeps the first MAX_CONSOLE bytes and drains the rest.
``-serial file:`` would let a guest that prints without end fill the state directory during a days-long lab.

QMP is three JSON lines here (greeting, ``qmp_capabilities``, one command), so a small synchronous client is
written out below rather than pulling in ``qemu.qmp``, whose API is asyncio with a deprecated sync wrapper.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from appliance.demo.qemu import accel_setting
from appliance.errors import BootbackError

MAX_CONSOLE = 1 << 20  # console bytes kept per guest; the rest is read and dropped
QMP_TIMEOUT = 10.0
MAX_AGENT_LINE = 64 << 10  # bytes of one guest-agent reply read (the guest is not trusted to end its lines)
CONNECT_TIMEOUT = 60.0  # qemu connects its serial port while it starts, or it has failed


class MachineError(BootbackError):
    """A guest's qemu could not be driven."""


class Machine:
    def __init__(self, name: str, workdir: Path, drives: list[str], tap_fd: int, mac: str, memory_mib: int, nic: str):
        self.name = name
        self.console_log = Path(workdir) / f"{name}.console"
        sock = hashlib.sha256(name.encode()).hexdigest()[:8]  # short: a socket path has at most 107 bytes
        self.qmp_path = Path(workdir) / f"{sock}.qmp"
        self.serial_path = Path(workdir) / f"{sock}.serial"
        self.agent_path = Path(workdir) / f"{sock}.qga"
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
            "-chardev",
            f"socket,id=console,path={self.serial_path},server=off",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vserial",
            "-chardev",
            f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device",
            "virtserialport,bus=vserial.0,chardev=agent,name=org.qemu.guest_agent.0",
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
        self.serial_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.serial_path))
            listener.listen(1)
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=open(self.console_log.with_suffix(".qemu.log"), "wb"),  # noqa: SIM115 - the child keeps it
                pass_fds=(self.tap_fd,),
            )
        except BaseException:
            listener.close()
            raise
        finally:
            os.close(self.tap_fd)  # qemu holds the tap now; our copy would keep the device after qemu exits
        threading.Thread(target=self._read_console, args=(listener,), daemon=True, name=f"console-{self.name}").start()

    def _read_console(self, listener: socket.socket) -> None:
        listener.settimeout(CONNECT_TIMEOUT)
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # qemu did not start; its error is in the .qemu.log
        finally:
            listener.close()
            self.serial_path.unlink(missing_ok=True)
        kept = 0
        with conn, open(self.console_log, "ab") as log:
            while data := conn.recv(1 << 16):
                if kept < MAX_CONSOLE:
                    part = data[: MAX_CONSOLE - kept]
                    log.write(part)
                    log.flush()
                    kept += len(part)

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

    def guest_agent_ping(self, wait: float) -> None:
        """guest-sync (a random id, echoed back) then guest-ping on the agent channel; TimeoutError when the
        agent does not answer within ``wait`` seconds, MachineError when it answers with an error."""
        sync_id = int.from_bytes(os.urandom(4), "big")
        deadline = time.monotonic() + wait
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(wait)
            try:
                s.connect(str(self.agent_path))
            except OSError as exc:
                raise MachineError(f"{self.name}: no guest agent channel: {exc.strerror or exc}") from None
            reader = s.makefile("rb")
            for doc, want in (
                ({"execute": "guest-sync", "arguments": {"id": sync_id}}, sync_id),
                ({"execute": "guest-ping"}, {}),
            ):
                s.sendall(json.dumps(doc).encode() + b"\n")
                while True:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    line = reader.readline(MAX_AGENT_LINE)  # TimeoutError when the agent is silent
                    if not line:
                        raise TimeoutError  # the channel closed: no agent behind it yet
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue  # a partial or foreign line: only a matching reply counts
                    if isinstance(reply, dict) and "error" in reply:
                        raise MachineError(f"{self.name}: guest agent: {doc['execute']}: {reply['error']}")
                    if isinstance(reply, dict) and reply.get("return") == want:
                        break

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

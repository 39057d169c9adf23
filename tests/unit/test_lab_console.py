"""A lab guest's console is bounded: a guest that prints without end is drained, and only the first
MAX_CONSOLE bytes are kept (a sandbox lab runs for days)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from appliance.lab.machine import MAX_CONSOLE, Machine


def test_a_chatty_console_is_drained_and_cut(tmp_path: Path) -> None:
    machine = Machine("chatty", tmp_path, [], -1, "52:54:00:6c:00:00", 96, "e1000")
    machine.console_log.write_text("")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(machine.serial_path))
    listener.listen(1)
    reader = threading.Thread(target=machine._read_console, args=(listener,))
    reader.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as guest:  # what qemu does with the serial port
        guest.settimeout(20)
        guest.connect(str(machine.serial_path))
        line = b"bootback-lab: still talking\n" * 1000
        for _ in range(3 * MAX_CONSOLE // len(line)):
            guest.sendall(line)  # never blocks for long: the reader drains what it does not keep
    reader.join(20)
    assert not reader.is_alive()
    assert machine.console_log.stat().st_size == MAX_CONSOLE
    assert machine.console().startswith("bootback-lab: still talking\n")
    assert not machine.serial_path.exists()

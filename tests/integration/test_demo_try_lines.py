"""`./run demo` prints "try" lines; each runs as printed, by a shell in the directory the demo was started from,
with the virtualenv not on PATH (as after `./run demo` in a fresh clone)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.daemon_process import ROOT, free_port

VENV_BOOTBACK = ROOT / ".venv" / "bin" / "bootback"


def test_the_printed_try_lines_run_as_printed(tmp_path: Path, build_cache: Path) -> None:
    root = tmp_path / "clone"
    (root / ".venv" / "bin").mkdir(parents=True)
    # the clone's .venv/bin/bootback, as ./run starts it (a link to this checkout's, so no second virtualenv)
    os.symlink(VENV_BOOTBACK, root / ".venv" / "bin" / "bootback")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    env = {**os.environ, "PATH": path, "BOOTBACK_BUILD_CACHE": str(build_cache), "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(
        [
            ".venv/bin/bootback",
            "demo",
            "--bind",
            "127.0.0.1",
            "--control-port",
            str(free_port()),
            "--portmap-port",
            "0",
            "--nfs-port",
            "0",
            "--mount-port",
            "0",
            "--no-web",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out = ""
    try:
        deadline = time.monotonic() + 300
        # the block of try lines ends with an empty line
        while (
            not ("  try        : " in out and out.endswith("\n\n"))
            and time.monotonic() < deadline
            and proc.poll() is None
        ):
            out += proc.stdout.readline()
        lines = out.split("  try        : ", 1)[1].splitlines()[:3]
        assert lines[0].startswith(".venv/bin/bootback publish demo-vm"), out
        for line in lines:
            done = subprocess.run(
                ["bash", "-c", line.strip()], cwd=root, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, f"{line.strip()!r}: {done.stdout}{done.stderr}"
            assert done.stdout.strip(), line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)

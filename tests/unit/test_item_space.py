"""The item jobs' space guard on a real small file system (a 16 MiB tmpfs in a mount namespace of its own): a dump
tool's output stops before it would cross the reserve, and a process writing on its own is killed by the poll."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

RESERVE = 8 << 20
SCRIPT = f"""
import subprocess, sys
from pathlib import Path
from appliance.errors import ItemRecoveryError
from appliance.items.space import SpaceGuard, free_bytes

d = Path(sys.argv[1])
guard = SpaceGuard(d, {RESERVE})
guard.start()
try:
    with open(d / "dump", "wb") as fh:
        print("RC", guard.run_into(["head", "-c", str(64 << 20), "/dev/zero"], fh)[0])
except ItemRecoveryError as exc:
    print("ERR", exc)
print("DUMPED", (d / "dump").stat().st_size, "FREE", free_bytes(d))
(d / "dump").unlink()

guard = SpaceGuard(d, {RESERVE}, interval=0.05)
guard.start()
proc = subprocess.Popen(["sh", "-c", f"head -c 12M /dev/zero > {{d}}/big; exec sleep 60"])
guard.watch(proc)
print("KILLED", proc.wait(timeout=20), "TRIPPED", guard.tripped is not None)
guard.stop()
"""


def run_on_tmpfs() -> dict[str, str]:
    p = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'd=$(mktemp -d) && mount -t tmpfs -o size=16m bb-guard "$d" || exit 99; "$0" -c "$1" "$d"; rc=$?; '
            'umount "$d"; rmdir "$d"; exit $rc',
            sys.executable,
            SCRIPT,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    return {"out": p.stdout, **{w: words[i + 1] for i, w in enumerate(words[:-1]) if w.isupper()}}


def test_the_guard_stops_a_dump_before_the_reserve_and_kills_a_writer_it_watches() -> None:
    seen = run_on_tmpfs()
    assert "ERR item recovery stopped: " in seen["out"] and f"below the reserve of {RESERVE:,} bytes" in seen["out"]
    assert int(seen["DUMPED"]) <= (16 << 20) - RESERVE and int(seen["FREE"]) >= RESERVE, seen["out"]
    assert seen["KILLED"] == "-9" and seen["TRIPPED"] == "True", seen["out"]

"""Our NFS server (``python -m nfsd DIR``) against nfs-ganesha, serving the same 1 GiB file of random bytes.

Measures, for each server in turn (qemu's nfs driver always asks the portmapper on 111, so only one NFS server
can be registered there at a time): sequential ``nfs-cat`` MB/s (best of 3) and ``qemu-img bench`` 4 KiB
reads/s at queue depth 16 (best of 2). Then profiles our server with py-spy during the same 4 KiB load.
Run: ``./run bench nfsd`` (or ``.venv/bin/python -m bench nfsd``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench._common import (
    RESULTS,
    WORK,
    Row,
    file_sha256,
    ganesha,
    log,
    nfs_cat_mbs,
    nfs_sha256,
    port_owner,
    python,
    qemu_bench,
    random_file,
    report,
    require_no_nfs_on_111,
    sh,
)

SIZE = 1 << 30
QEMU_COUNT = 100_000
PROFILE_SECONDS = 10


def measure(url: str, size: int, cat_runs: int, qemu_runs: int, digest: str) -> dict[str, float]:
    """Verify the bytes once (also warms the server's caches), then time both clients."""
    if nfs_sha256(url) != digest:
        raise RuntimeError(f"{url}: the server returned different bytes than the file holds")
    seq = max(nfs_cat_mbs(url, size) for _ in range(cat_runs))
    rnd = max(qemu_bench(url, QEMU_COUNT) for _ in range(qemu_runs))
    log(f"sequential {seq:.0f} MB/s, 4k qd16 {rnd:.0f} reads/s")
    return {"seq_mb_s": seq, "reads_s": rnd}


def py_spy() -> str:
    """The py-spy binary beside our interpreter; installed from PyPI on first use."""
    exe = Path(python()).with_name("py-spy")
    if not exe.exists():
        sh(python(), "-m", "pip", "install", "-q", "py-spy")
    return str(exe)


def profile(pid: int, url: str, reads_s: float) -> dict[str, object]:
    """py-spy on our server under the same 4 KiB load: a flame graph, own/inclusive time per function, and
    the same restricted to samples holding the GIL (what serialises a Python server)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    svg, raw, gil = (RESULTS / f"nfsd-4k-profile{s}" for s in (".svg", ".txt", "-gil.txt"))
    runs = (("flamegraph", svg, []), ("raw", raw, []), ("raw", gil, ["--gil"]))
    cpu = []
    for fmt, out, extra in runs:
        cpu.append(_record(pid, url, reads_s, ["--format", fmt, "-o", str(out), *extra]))
    own, incl, total = summarize(raw.read_text())
    gil_own, _, gil_total = summarize(gil.read_text())
    return {
        "svg": str(svg.relative_to(RESULTS.parent.parent)),
        "samples": total,
        "server_cpu": max(cpu),
        "own": own.most_common(12),
        "inclusive": incl.most_common(15),
        "gil_samples": gil_total,
        "gil_own": gil_own.most_common(12),
    }


def _record(pid: int, url: str, reads_s: float, args: list[str]) -> float:
    """One py-spy window under load; returns the server's CPU use in that window (1.0 = one core)."""
    # The load must outlast the sampling window; py-spy slows the server a little, hence the margin.
    count = int(reads_s * (PROFILE_SECONDS + 8))
    load = subprocess.Popen(
        ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4k", "-S", "5000k", "-t", "none", url],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)  # past connection setup
    try:
        before, t0 = _cpu_seconds(pid), time.monotonic()
        sh(py_spy(), "record", "--nonblocking", "--pid", str(pid), "-d", str(PROFILE_SECONDS), *args)
        return (_cpu_seconds(pid) - before) / (time.monotonic() - t0)
    finally:
        load.kill()
        load.wait()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def summarize(collapsed: str) -> tuple[Counter[str], Counter[str], int]:
    """Own and inclusive sample counts per function from py-spy's collapsed stacks ("a;b;c N")."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";") if f]  # no --threads: no thread frame first
        total += int(n)
        if frames:
            own[frames[-1]] += int(n)
        for f in {f for f in frames if not _is_boilerplate(f)}:
            incl[f] += int(n)
    return own, incl, total


def _is_boilerplate(name: str) -> bool:
    # frames under every sample of the loop thread (interpreter start, asyncio.run, run_forever ...)
    return any(f"({p})" in name for p in ("<frozen runpy>", "nfsd/__main__.py", "asyncio/runners.py")) or name in {
        "BaseEventLoop.run_forever (asyncio/base_events.py)",
        "BaseEventLoop.run_until_complete (asyncio/base_events.py)",
    }


def _short(frame: str) -> str:
    # "read (nfsd/localfs.py:223)" -> "read (nfsd/localfs.py)": own time per function, not per line
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def run_ours(directory: Path, url: str, digest: str, runs: tuple[int, int]) -> tuple[dict, dict]:
    from tests.nfsd_process import NfsdProcess

    require_no_nfs_on_111("our server")
    server = NfsdProcess(directory, "--bind", "127.0.0.1", secret=WORK / "secret").start()
    try:
        log(f"ours: {server.output.strip().splitlines()[-1]}")
        result = measure(url, SIZE, *runs, digest)
        assert server.proc is not None
        prof = profile(server.proc.pid, url, result["reads_s"])
    finally:
        server.stop()
    return result, prof


def run_ganesha(directory: Path, url: str, digest: str, runs: tuple[int, int]) -> dict:
    with ganesha(directory):
        log(f"ganesha on 111: {port_owner(111)}")
        return measure(url, SIZE, *runs, digest)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench nfsd")
    ap.add_argument("--quick", action="store_true", help="one run each (a smoke test, not a result)")
    args = ap.parse_args(argv)
    runs = (1, 1) if args.quick else (3, 2)
    directory = WORK / "nfsd" / "export"
    # ganesha caches paths: the file must exist before it starts
    big = random_file(directory / "big.bin", SIZE)
    digest = file_sha256(big)
    url = f"nfs://127.0.0.1{directory}/big.bin"
    ours, prof = run_ours(directory, url, digest, runs)
    anchor = run_ganesha(directory, url, digest, runs)
    rows = [
        Row("sequential read, nfs-cat (best of 3)", ours["seq_mb_s"], anchor["seq_mb_s"], "MB/s"),
        Row("4 KiB random read qd16, qemu-img bench (best of 2)", ours["reads_s"], anchor["reads_s"], "reads/s"),
    ]
    report("nfsd", "./run bench nfsd", rows, {"profile": prof, "file_bytes": SIZE})
    print(
        f"  py-spy: server CPU {prof['server_cpu']:.2f} cores; own time of {prof['samples']} samples, then of "
        f"{prof['gil_samples']} holding the GIL:"
    )
    for key, total in (("own", "samples"), ("gil_own", "gil_samples")):
        for name, n in prof[key][:8]:  # type: ignore[index]
            print(f"    {n / prof[total]:6.1%}  {name}")  # type: ignore[operator]
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

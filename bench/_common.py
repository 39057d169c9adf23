"""Helpers shared by the benchmark modules: work dirs, timing, NFS clients, ganesha, inputs, results.

Every benchmark compares us with an anchor measured in the same run, so the helpers here measure *a URL*
or *a command*, never "our server" specifically: the same code path times both sides.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BOOTBACK_BENCH_DIR", "/var/tmp/bootback-bench"))
RESULTS = ROOT / "bench" / "results"
GANESHA = ROOT.parent / "shared" / "anchors" / "ganesha.sh"
MiB = 1 << 20


@dataclass
class Row:
    """One line of a result table: ``ratio`` is ours/anchor, ``target`` a predicate on the ratio."""

    metric: str
    ours: float
    anchor: float
    unit: str
    target: str = ""  # e.g. ">= 1.0"; empty: informational
    ratio: float = 0.0
    met: bool | None = None

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.anchor if self.anchor else float("nan")
        if self.target:
            # "OP VALUE" bounds the ratio; "ours OP VALUE" bounds our own figure (e.g. a latency in ms)
            *subject, op, value = self.target.split()
            measured = self.ours if subject == ["ours"] else self.ratio
            self.met = _COMPARE[op](measured, float(value))


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


def sh(
    *cmd: str | Path,
    check: bool = True,
    discard: bool = False,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command; ``discard`` sends stdout to /dev/null (bulk data), stderr is kept for the error."""
    out = subprocess.DEVNULL if discard else subprocess.PIPE
    p = subprocess.run(
        [str(c) for c in cmd], stdout=out, stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})}
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def best_of(n: int, fn: Callable[[], float], higher: bool = True) -> float:
    """Best of ``n`` runs: the least disturbed by the other processes on a 2-core machine."""
    values = [fn() for _ in range(n)]
    return max(values) if higher else min(values)


@contextmanager
def exclusive_run() -> Iterator[None]:
    """One benchmark run at a time on this machine: two would share 2 cores and fight over port 111."""
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another benchmark run to finish ({WORK / '.lock'})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        code_version()
        yield


# --- NFS clients ------------------------------------------------------------------------------------------
def nfs_cat_mbs(url: str, size: int) -> float:
    """Sequential read of a whole file with libnfs' nfs-cat, in MB/s (10^6 bytes)."""
    start = time.perf_counter()
    sh("nfs-cat", url, discard=True)
    return size / (time.perf_counter() - start) / 1e6


def nfs_sha256(url: str) -> str:
    """Hash of what the server returns, streamed: proves a benchmark reads the right bytes."""
    h = hashlib.sha256()
    with subprocess.Popen(["nfs-cat", url], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while block := p.stdout.read(MiB):
            h.update(block)
    if p.returncode != 0:
        raise RuntimeError(f"nfs-cat {url} failed ({p.returncode})")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def qemu_bench_cmd(
    url: str, count: int, size: str = "4k", depth: int = 16, step: str | None = "5000k", write: bool = False
) -> list[str]:
    """The ``qemu-img bench`` command line (raw, cache=none); ``step`` None: sequential."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", size, "-t", "none"]
    return cmd + (["-S", step] if step else []) + (["-w"] if write else []) + [url]


def qemu_bench_seconds(out: str) -> float:
    """The wall time ``qemu-img bench`` prints for its whole run (connecting is not in it)."""
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {out}")
    return float(m[1])


def qemu_bench(
    url: str, count: int, size: str = "4k", depth: int = 16, step: str | None = "5000k", write: bool = False
) -> float:
    """Operations per second from ``qemu-img bench``."""
    return count / qemu_bench_seconds(sh(*qemu_bench_cmd(url, count, size, depth, step, write)).stdout)


# --- the portmapper and ganesha ---------------------------------------------------------------------------
def port_owner(port: int) -> str | None:
    """Who listens on TCP ``port`` (ss's process column), None if nobody: qemu can only use port 111."""
    out = sh("ss", "-Hltnp", f"sport = :{port}").stdout.strip()
    return out or None


def rpc_programs() -> str:
    """Programs registered with the portmapper on 111 (empty if none answers)."""
    return sh("rpcinfo", "-p", "127.0.0.1", check=False).stdout


def nfs_registered() -> bool:
    return any(line.split()[:1] == ["100003"] for line in rpc_programs().splitlines()[1:])


def require_no_nfs_on_111(who: str, wait: float = 600) -> None:
    """Wait (a test run may hold 111 for a while) until no NFS server is registered with the portmapper:
    a stale or foreign registration would send qemu to a dead server, or the wrong one."""
    deadline, told = time.monotonic() + wait, False
    while nfs_registered():
        if time.monotonic() > deadline:
            raise RuntimeError(f"before {who}: an NFS server is still registered on port 111:\n{rpc_programs()}")
        if not told:
            log(f"before {who}: waiting for the NFS server registered on 111 to go ({port_owner(111)})")
            told = True
        time.sleep(2)


def rpc_tcp_ports() -> dict[int, int]:
    """TCP port of each program (version 3) registered on 111: {100003: nfs, 100005: mount}."""
    ports = {}
    for line in rpc_programs().splitlines()[1:]:
        f = line.split()
        if len(f) >= 4 and f[1] == "3" and f[2] == "tcp":
            ports[int(f[0])] = int(f[3])
    return ports


@contextmanager
def ganesha(directory: Path) -> Iterator[int]:
    """nfs-ganesha exporting ``directory`` under its own path; registered on 111 for qemu. Yields its pid."""
    require_no_nfs_on_111("ganesha")
    out = sh("bash", GANESHA, "start", directory).stdout
    try:
        yield int(out.split()[-1])
    finally:
        sh("bash", GANESHA, "stop", check=False)


# --- server CPU -------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": fields 3.. of proc(5)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``, its reaped children and its live descendants:
    a server that spreads work over worker processes is counted whole."""
    f = _stat_fields(pid)
    total = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError):
                continue  # gone meanwhile
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            total += sum(int(x) for x in _stat_fields(child)[11:15])
        except OSError:
            continue
        todo += children.get(child, [])
    return total / _TICK


@contextmanager
def cpu_meter(pid: int) -> Iterator[dict[str, float]]:
    """Measures the server ``pid``'s CPU over the block: fills ``cpu_s``, ``wall_s`` and ``cores`` (cpu/wall)."""
    result: dict[str, float] = {}
    cpu0, t0 = process_tree_cpu(pid), time.perf_counter()
    yield result
    result["cpu_s"] = process_tree_cpu(pid) - cpu0
    result["wall_s"] = time.perf_counter() - t0
    result["cores"] = result["cpu_s"] / result["wall_s"]


# --- inputs -----------------------------------------------------------------------------------------------
def random_file(path: Path, size: int) -> Path:
    """``size`` random bytes, written once and reused by later runs."""
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    tmp.replace(path)
    return path


def debian_image(size_mib: int = 1536, extra_mib: int = 700) -> Path:
    """An ext4 image of a Debian bookworm minbase root plus ~``extra_mib`` of the host's /usr/lib (built once)."""
    img = WORK / "inputs" / "debian-ext4.raw"
    if img.exists():
        return img
    rootdir = WORK / "inputs" / "rootfs"
    shutil.rmtree(rootdir, ignore_errors=True)
    rootdir.parent.mkdir(parents=True, exist_ok=True)
    log("mmdebstrap --variant=minbase bookworm (once)")
    sh("mmdebstrap", "--variant=minbase", "--quiet", "bookworm", rootdir)
    extra = rootdir / "opt" / "hostlib"
    extra.mkdir(parents=True)
    for src in _hostlib_dirs(extra_mib * MiB):
        sh("cp", "-a", src, extra / src.name)
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    sh("mkfs.ext4", "-q", "-F", "-d", rootdir, tmp, f"{size_mib}M")
    tmp.replace(img)
    shutil.rmtree(rootdir, ignore_errors=True)
    return img


def _hostlib_dirs(budget: int) -> list[Path]:
    """Directories of /usr/lib, in name order, until ``budget`` bytes: real binaries compress like a disk."""
    picked, total = [], 0
    for d in sorted(p for p in Path("/usr/lib").iterdir() if p.is_dir() and not p.is_symlink()):
        size = int(sh("du", "-sb", d).stdout.split()[0])
        if total + size <= budget:
            picked.append(d)
            total += size
    return picked


def changed_copy(src: Path, dst: Path, fraction: float = 0.01, seed: int = 1) -> Path:
    """A sparse copy of ``src`` with ``fraction`` of its 1 MiB blocks overwritten by random bytes, spread out."""
    if dst.exists():
        return dst
    tmp = dst.with_suffix(".tmp")
    sh("cp", "--sparse=always", src, tmp)
    blocks = src.stat().st_size // MiB
    rnd = random.Random(seed)
    stride = int(1 / fraction)
    with open(tmp, "r+b") as f:
        for base in range(0, blocks - stride + 1, stride):
            f.seek((base + rnd.randrange(stride)) * MiB)
            f.write(rnd.randbytes(MiB))
    tmp.replace(dst)
    return dst


def warm_page_cache(*paths: Path) -> None:
    """Read files once so every tool starts from the same (cached) state: we cannot drop caches here."""
    for i in range(0, len(paths), 500):  # many small files (chunks): a few cat calls, not one per file
        sh("cat", *paths[i : i + 500], discard=True)


def du_bytes(path: Path) -> int:
    return int(sh("du", "-sb", path).stdout.split()[0])


# --- results ----------------------------------------------------------------------------------------------
def machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": _os_name(),
    }


@functools.cache
def code_version() -> dict[str, object]:
    """The commit measured, and the files that differed from it (outside bench/): results name their code.
    Cached: taken when the run starts (``exclusive_run``), not when a result is written."""
    head = sh("git", "rev-parse", "--short", "HEAD", check=False, cwd=ROOT).stdout.strip()
    status = sh("git", "status", "--porcelain", check=False, cwd=ROOT).stdout.splitlines()
    return {"commit": head, "modified": [line[3:] for line in status if not line[3:].startswith("bench/")]}


def _os_name() -> str:
    try:
        return re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())[1]  # type: ignore[index]
    except (OSError, TypeError):
        return platform.platform()


def report(name: str, command: str, rows: Sequence[Row], extra: dict[str, object] | None = None) -> dict:
    """Print the table and write ``bench/results/<name>.json``."""
    print(f"{'metric':<44} {'ours':>12} {'anchor':>12} {'ratio':>7}  target   met")
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(
            f"{r.metric:<44} {r.ours:>12.4g} {r.anchor:>12.4g} {r.ratio:>7.3f}  {r.target or '-':<8} {met}   ({r.unit})"
        )
    doc = {
        "benchmark": name,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "rows": [asdict(r) for r in rows],
        **(extra or {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"  wrote {RESULTS / f'{name}.json'}")
    return doc


def python() -> str:
    """The interpreter running the benchmarks (the project's .venv): servers run under it too."""
    return sys.executable

"""Our repository against borgbackup 1.4 on a realistic disk, and our random-access reader against the raw file.

Input: an ext4 image (1.5 GiB, sparse) of a Debian bookworm minbase root plus part of the host's /usr/lib,
then a copy with 1 % of its 1 MiB blocks overwritten. Both tools back up the image, then the changed copy,
with the same settings (fixed 1 MiB chunks, zstd level 3, no encryption); both read from the page cache.
Then 4 KiB random reads through ``Repository.open_disk`` (cold and warm chunk cache) vs ``os.pread``.
Run: ``./run bench repo`` (or ``.venv/bin/python -m bench repo``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import (
    WORK,
    Row,
    changed_copy,
    debian_image,
    du_bytes,
    log,
    python,
    report,
    sh,
    warm_page_cache,
)

BORG_VENV = WORK / "borgvenv"
BORG_ENV = {
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    "BORG_BASE_DIR": str(WORK / "repo" / "borg-home"),
}
READS = 20_000
FITS_CACHE = 128 << 20  # a working set half the size of the reader's default chunk cache
BLOCK = 4096


def borg() -> str:
    """borg 1.4 in its own venv (it must not share ours); built from PyPI on first use."""
    exe = BORG_VENV / "bin" / "borg"
    if not exe.exists():
        sh("python3", "-m", "venv", BORG_VENV)
        sh(BORG_VENV / "bin" / "pip", "install", "-q", "borgbackup>=1.4,<1.5")
    return str(exe)


def bootback() -> str:
    return str(Path(python()).with_name("bootback"))


def stage(images: dict[str, Path]) -> dict[str, Path]:
    """Hard links named ``<label>/disk.raw``: both tools see one file name, on a new inode each time, so
    borg's files cache cannot skip the read and our disk name stays the same between backups."""
    out = {}
    for label, img in images.items():
        link = WORK / "repo" / "src" / label / "disk.raw"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.link(img, link)
        out[label] = link
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def backup_round(sources: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Fresh repositories, then both tools on each input in turn, each preceded by a read of that input."""
    ours, theirs = WORK / "repo" / "ours", WORK / "repo" / "borg"
    for d in (ours, theirs, WORK / "repo" / "borg-home"):
        shutil.rmtree(d, ignore_errors=True)
    sh(bootback(), "init", ours, "--chunk-size", "1M", "--encryption", "none")
    sh(borg(), "init", "-e", "none", theirs, env=BORG_ENV)
    results: dict[str, dict[str, float]] = {}
    for label, disk in sources.items():
        warm_page_cache(disk)
        t_ours = timed(lambda d=disk: sh(bootback(), "backup", ours, "--vm", "bench", d, "--json"))
        warm_page_cache(disk)
        t_borg = timed(
            lambda d=disk, a=label: sh(
                borg(),
                "create",
                "--chunker-params",
                "fixed,1048576",
                "--compression",
                "zstd,3",
                f"{theirs}::{a}",
                d.name,
                cwd=d.parent,
                env=BORG_ENV,
            )
        )
        results[label] = {
            "ours_s": t_ours,
            "borg_s": t_borg,
            "ours_bytes": du_bytes(ours),
            "borg_bytes": du_bytes(theirs),
        }
        log(
            f"backup {label}: ours {t_ours:.1f} s, borg {t_borg:.1f} s; stored ours "
            f"{results[label]['ours_bytes'] / 1e6:.0f} MB, borg {results[label]['borg_bytes'] / 1e6:.0f} MB"
        )
    return results


def backups(sources: dict[str, Path], rounds: int) -> dict[str, dict]:
    """Best of ``rounds`` for the times (fsync-heavy writes on a shared VM disk vary by +-50 %); all kept."""
    runs = [backup_round(sources) for _ in range(rounds)]
    out: dict[str, dict] = {}
    for label, disk in sources.items():
        size = disk.stat().st_size
        best_ours, best_borg = (min(r[label][k] for r in runs) for k in ("ours_s", "borg_s"))
        out[label] = {
            **runs[-1][label],
            "ours_s": best_ours,
            "borg_s": best_borg,
            "ours_mb_s": size / best_ours / 1e6,
            "borg_mb_s": size / best_borg / 1e6,
            "all_ours_s": [r[label]["ours_s"] for r in runs],
            "all_borg_s": [r[label]["borg_s"] for r in runs],
        }
    out["borg_cache"] = {"bytes": du_bytes(WORK / "repo" / "borg-home")}
    return out


def read_offsets(chunks: list[str | None], chunk_size: int, size: int, n: int, span: int | None = None) -> list[int]:
    """``n`` random 4 KiB-aligned offsets inside stored (non-zero) chunks: the image's used area (or only its
    first ``span`` bytes of stored chunks)."""
    rnd = random.Random(42)
    used = [i for i, c in enumerate(chunks) if c is not None][: span // chunk_size if span else None]
    per_chunk = chunk_size // BLOCK
    offsets = (rnd.choice(used) * chunk_size + rnd.randrange(per_chunk) * BLOCK for _ in range(n))
    return [o for o in offsets if o + BLOCK <= size]


def read_pass(read: Callable[[int, int], bytes], offsets: list[int]) -> tuple[float, list[bytes]]:
    """Reads/s over ``offsets``; the data is kept so the caller can check it after the clock stops."""
    out = []
    start = time.perf_counter()
    for off in offsets:
        out.append(read(off, BLOCK))
    return len(offsets) / (time.perf_counter() - start), out


def random_reads(raw_image: Path) -> dict[str, float]:
    from appliance.repo import Repository

    repo = Repository.open(WORK / "repo" / "ours")  # fresh: empty chunk cache
    point = repo.restore_point("bench", "latest")
    reader = repo.open_disk(point, point.disks[0].name)
    offsets = read_offsets(point.disks[0].chunks, reader.chunk_size, reader.size, READS)
    # This machine pages out memory idle for ~60 s (DAMON): read each side's files right before its pass.
    warm_page_cache(raw_image)
    fd = os.open(raw_image, os.O_RDONLY)
    try:
        raw, raw_data = read_pass(lambda off, n: os.pread(fd, n, off), offsets)
    finally:
        os.close(fd)
    warm_page_cache(*repo.store.chunks_dir.glob("*/*"))
    cold, cold_data = read_pass(reader.read, offsets)
    cold_misses = repo.chunk_cache.misses
    warm, warm_data = read_pass(reader.read, offsets)
    warm_misses = repo.chunk_cache.misses - cold_misses
    if not cold_data == warm_data == raw_data:
        raise RuntimeError("the repository reader returned different bytes than the raw image holds")
    # The same, in a working set that fits the chunk cache: the cost of a hit, apart from the miss rate.
    small = read_offsets(point.disks[0].chunks, reader.chunk_size, reader.size, READS, FITS_CACHE)
    read_pass(reader.read, small)
    fits, _ = read_pass(reader.read, small)
    hydrated = hydrated_reads(offsets, raw_data)
    used = sum(c is not None for c in point.disks[0].chunks) * reader.chunk_size
    log(
        f"4k reads/s: cold {cold:.0f}, warm {warm:.0f}, raw {raw:.0f}; used area {used / 2**20:.0f} MiB; "
        f"warm in {FITS_CACHE >> 20} MiB {fits:.0f}"
    )
    return {
        "cold": cold,
        "warm": warm,
        "raw": raw,
        "warm_fits_cache": fits,
        "warm_read_cache": hydrated,
        "used_bytes": used,
        "cold_misses": cold_misses,
        "warm_misses": warm_misses,
        "cache_bytes": repo.chunk_cache.capacity,
        "reads": len(offsets),
    }


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def hydrated_reads(offsets: list[int], expected: list[bytes]) -> float | None:
    """Warm reads through the daemon's read cache (chunks hydrated into a local sparse file), where the
    working tree has one (``appliance.repo.readcache``, work in progress); None where it has not."""
    from appliance.repo import Repository

    try:
        from appliance.repo.readcache import ReadCache
    except ImportError:
        return None
    repo = Repository.open(WORK / "repo" / "ours")
    point = repo.restore_point("bench", "latest")
    cache = ReadCache(WORK / "repo" / "readcache", 4 << 30)
    try:
        reader = repo.open_disk(point, point.disks[0].name, read_cache=cache)
        read_pass(reader.read, offsets)  # hydrates every chunk the offsets touch
        rate, data = read_pass(reader.read, offsets)
    finally:
        cache.close()
    if data != expected:
        raise RuntimeError("the read cache returned different bytes than the raw image holds")
    return rate


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench repo")
    ap.add_argument("--quick", action="store_true", help="one backup round (a smoke test, not a result)")
    args = ap.parse_args(argv)
    base = debian_image()
    changed = changed_copy(base, WORK / "inputs" / "debian-ext4-changed.raw")
    sources = stage({"first": base, "second": changed})
    size = base.stat().st_size
    log(f"input {base} ({size / 2**30:.2f} GiB apparent, {allocated(base) / 1e6:.0f} MB allocated)")
    b = backups(sources, 1 if args.quick else 3)
    r = random_reads(changed)
    first, second = b["first"], b["second"]
    rows = [
        Row(
            "backup 1 throughput (size / wall time, best of 3)",
            first["ours_mb_s"],
            first["borg_mb_s"],
            "MB/s",
            ">= 1.0",
        ),
        Row("backup 2 throughput, 1 % of blocks changed", second["ours_mb_s"], second["borg_mb_s"], "MB/s", ">= 1.0"),
        Row("stored size after backup 1 (du -sb)", first["ours_bytes"], first["borg_bytes"], "bytes", "<= 1.0"),
        Row("stored size after backup 2 (du -sb)", second["ours_bytes"], second["borg_bytes"], "bytes", "<= 1.0"),
        Row("4 KiB random reads, warm reader vs os.pread", r["warm"], r["raw"], "reads/s", ">= 0.5"),
        Row("4 KiB random reads, cold reader vs os.pread", r["cold"], r["raw"], "reads/s"),
        Row("4 KiB random reads, warm, 128 MiB working set", r["warm_fits_cache"], r["raw"], "reads/s"),
    ]
    if r["warm_read_cache"] is not None:
        rows.append(
            Row("4 KiB random reads, warm, with ReadCache", r["warm_read_cache"], r["raw"], "reads/s", ">= 0.5")
        )
    borg_version = sh(borg(), "--version").stdout.strip()
    extra = {
        "input_bytes": size,
        "input_allocated_bytes": allocated(base),
        "backups": b,
        "reads": r,
        "borg": borg_version,
        "points": json.loads(sh(bootback(), "points", WORK / "repo" / "ours", "--json").stdout),
    }
    report("repo", "./run bench repo", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

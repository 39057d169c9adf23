"""What encryption costs: backup and restore throughput of an aes-256-gcm repository against an unencrypted one.

Input: the same ext4 image as ``bench repo`` (a Debian root plus host libraries, 1.5 GiB apparent). Each round
makes two fresh repositories (``--encryption none`` and ``--encryption aes-256-gcm`` with a key file, so no
scrypt in the timings), backs the image up into each, then restores each to a file; the input is read into the
page cache before each backup. The anchor is the unencrypted repository, the same code without the envelope
and with SHA-256 instead of HMAC-SHA256 chunk ids. Best of 3 rounds (``--quick``: 1).
Run: ``./run bench encryption`` (or ``.venv/bin/python -m bench encryption``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bench._common import WORK, Row, debian_image, du_bytes, log, python, report, sh, warm_page_cache

BASE = WORK / "encryption"


def bootback() -> str:
    return str(Path(python()).with_name("bootback"))


def one_round(image: Path) -> dict[str, dict[str, float]]:
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    out: dict[str, dict[str, float]] = {}
    for mode in ("none", "aes-256-gcm"):
        repo, key = BASE / mode, BASE / f"{mode}.key"
        keys = ["--key-file", str(key)] if mode != "none" else []
        sh(bootback(), "init", repo, "--chunk-size", "1M", "--encryption", mode, *keys)
        warm_page_cache(image)
        start = time.perf_counter()
        sh(bootback(), "backup", repo, "--vm", "bench", image, "--json", *keys)
        backup_s = time.perf_counter() - start
        restored = BASE / f"{mode}.raw"
        start = time.perf_counter()
        sh(bootback(), "restore", repo, "bench", "-o", restored, "--json", *keys)
        restore_s = time.perf_counter() - start
        if sh("cmp", image, restored, check=False).returncode:
            raise RuntimeError(f"restore from the {mode} repository differs from the input")
        restored.unlink()
        out[mode] = {"backup_s": backup_s, "restore_s": restore_s, "stored_bytes": du_bytes(repo)}
        log(
            f"{mode}: backup {backup_s:.1f} s, restore {restore_s:.1f} s, "
            f"stored {out[mode]['stored_bytes'] / 1e6:.0f} MB"
        )
    return out


def chunk_pipeline(image: Path, limit: int = 512 << 20) -> dict[str, dict[str, float]]:
    """MB per CPU second (process time: other load on the machine does not count) through the per-chunk work,
    without the disk: id + compress + frame (+ encrypt) as a
    backup does, and open (+ decrypt) + decompress + id check as a reader does, on the image's non-zero 1 MiB
    blocks (at most ``limit`` bytes). Much steadier on a shared machine than the whole commands."""
    import zstandard

    from appliance.repo import objects
    from appliance.repo.keys import RepoKey
    from appliance.repo.store import chunk_id

    blocks = []
    with open(image, "rb") as f:
        while sum(map(len, blocks)) < limit and (block := f.read(1 << 20)):
            if block.count(0) != len(block):
                blocks.append(block)
    key = RepoKey.generate()
    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    out: dict[str, dict[str, float]] = {}
    for mode, envelope, ident in (
        ("none", objects.Envelope(), chunk_id),
        ("aes-256-gcm", objects.Envelope(key.aead), key.chunk_id),
    ):
        start = time.process_time()
        stored = []
        for block in blocks:
            cid = ident(block)
            framed = objects.pack(objects.CHUNK_MAGIC, block, cctx.compress(block))
            stored.append((cid, envelope.wrap(objects.CHUNK_MAGIC, framed, cid.encode())))
        write_s = time.process_time() - start
        start = time.process_time()
        for cid, blob in stored:
            inner = envelope.unwrap(objects.CHUNK_MAGIC, blob, cid, cid.encode(), len(blob))
            if ident(objects.unpack(objects.CHUNK_MAGIC, inner, cid, dctx, 1 << 20)) != cid:
                raise RuntimeError(f"{mode}: chunk {cid} did not round-trip")
        read_s = time.process_time() - start
        total = sum(map(len, blocks))
        out[mode] = {"write_mb_s": total / write_s / 1e6, "read_mb_s": total / read_s / 1e6, "bytes": total}
        log(f"{mode}: chunk pipeline write {out[mode]['write_mb_s']:.0f} MB/s, read {out[mode]['read_mb_s']:.0f} MB/s")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench encryption")
    ap.add_argument("--quick", action="store_true", help="one round (a smoke test, not a result)")
    args = ap.parse_args(argv)
    image = debian_image()
    size = image.stat().st_size
    pipeline = [chunk_pipeline(image) for _ in range(1 if args.quick else 3)]
    runs = [one_round(image) for _ in range(1 if args.quick else 3)]
    best = {
        mode: {k: min(r[mode][k] for r in runs) for k in ("backup_s", "restore_s")} for mode in ("none", "aes-256-gcm")
    }
    enc, plain = best["aes-256-gcm"], best["none"]
    cpu = {m: {k: max(p[m][k] for p in pipeline) for k in ("write_mb_s", "read_mb_s")} for m in ("none", "aes-256-gcm")}
    rows = [
        Row(
            "chunk pipeline, MB per CPU s, write side",
            cpu["aes-256-gcm"]["write_mb_s"],
            cpu["none"]["write_mb_s"],
            "MB/s",
        ),
        Row(
            "chunk pipeline, MB per CPU s, read side", cpu["aes-256-gcm"]["read_mb_s"], cpu["none"]["read_mb_s"], "MB/s"
        ),
        Row(
            "backup throughput, encrypted vs not",
            size / enc["backup_s"] / 1e6,
            size / plain["backup_s"] / 1e6,
            "MB/s",
            ">= 0.8",
        ),
        Row(
            "restore throughput, encrypted vs not",
            size / enc["restore_s"] / 1e6,
            size / plain["restore_s"] / 1e6,
            "MB/s",
            ">= 0.8",
        ),
        Row(
            "stored size, encrypted vs not",
            runs[-1]["aes-256-gcm"]["stored_bytes"],
            runs[-1]["none"]["stored_bytes"],
            "bytes",
            "<= 1.01",
        ),
    ]
    report("encryption", "./run bench encryption", rows, {"input_bytes": size, "runs": runs, "pipeline": pipeline})
    shutil.rmtree(BASE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

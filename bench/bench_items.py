"""Application item recovery: time to the first table listing (exact row counts) of a PostgreSQL cluster inside a
backup, with ``bootback items ... postgres --list`` (a disposable server on the copy-on-write view), against the
way without it: restore the whole disk (``bootback restore``), copy the data directory out of the image
(e2fsprogs' ``debugfs rdump``, no mount needed), start PostgreSQL on it and run the same listing query.

Input: an ext4 image (2 GiB) holding a PostgreSQL 15 cluster of about 1 GB (``pgbench -i -s 64``, then a checkpoint,
then copied while the server ran, so both sides run crash recovery), built once, backed up into a fresh repository.
Run: ``./run bench items``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._common import WORK, Row, log, python, report, sh, warm_page_cache

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCALE = 64  # pgbench scale: ~15 MB per unit
COUNT = (
    "(xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, "
    "true, '')))[1]::text::bigint"
)
LIST_SQL = (
    f"SELECT json_agg(json_build_array(n.nspname, c.relname, {COUNT})) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN "
    "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'"
)


def bootback() -> str:
    return str(Path(python()).with_name("bootback"))


def as_postgres() -> dict:
    import pwd

    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(datadir: Path, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [PG_BIN / "postgres", "-D", datadir, "-c", "listen_addresses=", "-c", f"unix_socket_directories={sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **as_postgres(),
    )
    while subprocess.run([PG_BIN / "pg_isready", "-q", "-h", sock], check=False).returncode != 0:
        if proc.poll() is not None:
            raise RuntimeError("postgres did not start")
        time.sleep(0.05)
    return proc


def build_input() -> Path:
    img = WORK / "inputs" / f"items-pg-s{SCALE}-ckpt.raw"
    if img.exists():
        return img
    base = WORK / "items-build"
    shutil.rmtree(base, ignore_errors=True)
    (base / "sock").mkdir(parents=True)
    base.chmod(0o755)
    for d in (base, base / "sock"):
        shutil.chown(d, "postgres", "postgres")
    data = base / "data"
    sh("runuser", "-u", "postgres", "--", PG_BIN / "initdb", "-D", data, "-U", "postgres", "--no-sync")
    proc = start_postgres(data, base / "sock")
    try:
        sh(PG_BIN / "createdb", "-h", base / "sock", "-U", "postgres", "bench")
        sh(PG_BIN / "pgbench", "-i", "-s", str(SCALE), "-q", "-h", base / "sock", "-U", "postgres", "bench")
        # A checkpoint, as a running server makes every few minutes: the copy is still crash-consistent, but
        # recovery replays minutes of WAL, not the whole bulk load (that worst case: see docs/operations.md).
        sh(PG_BIN / "psql", "-X", "-h", base / "sock", "-U", "postgres", "-d", "bench", "-c", "CHECKPOINT")
        tree = base / "tree" / "var/lib/postgresql/15"
        tree.mkdir(parents=True)
        sh("cp", "-a", data, tree / "main")  # while it runs: crash-consistent
    finally:
        proc.terminate()
        proc.wait()
    img.parent.mkdir(parents=True, exist_ok=True)
    tmp = img.with_suffix(".tmp")
    sh("mkfs.ext4", "-q", "-F", "-d", base / "tree", tmp, "2048M")
    tmp.replace(img)
    shutil.rmtree(base)
    return img


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench items")
    ap.add_argument("--quick", action="store_true", help="one round (a smoke test, not a result)")
    args = ap.parse_args(argv)
    # Item jobs keep the daemon's --min-free (100 GiB by default) free on their work directory; this benchmark
    # runs no VMs beside them, so a small reserve lets it run on a development machine's disk.
    os.environ.setdefault("BOOTBACK_MIN_FREE", "1G")
    if not (PG_BIN / "postgres").exists():
        print("bench items: needs Debian's postgresql-15", file=sys.stderr)
        return 1
    rounds = 1 if args.quick else 3
    img = build_input()
    root = WORK / "items"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)
    repo = root / "repo"
    sh(bootback(), "init", repo, "--encryption", "none")
    sh(bootback(), "backup", repo, "--vm", "pg", img)
    chunks = [p for p in (repo / "chunks").rglob("*") if p.is_file()]
    work = root / "work"

    def ours(count: bool) -> tuple[float, dict]:
        start = time.perf_counter()
        flags = () if count else ("--no-count",)
        out = sh(bootback(), "items", repo, "pg", "postgres", "--list", *flags, "--json", "--work-dir", work).stdout
        return time.perf_counter() - start, {(t["schema"], t["table"]): t["rows"] for t in json.loads(out)}

    def anchor(count: bool) -> tuple[float, dict]:
        scratch = root / "anchor"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "sock").mkdir(parents=True)
        start = time.perf_counter()
        sh(bootback(), "restore", repo, "pg", "-o", scratch / "disk.raw")
        sh("debugfs", "-R", f"rdump /var/lib/postgresql/15/main {scratch}", scratch / "disk.raw")
        sh("chown", "-R", "postgres:postgres", scratch)
        os.chmod(scratch / "main", 0o700)
        (scratch / "main" / "postmaster.pid").unlink(missing_ok=True)
        proc = start_postgres(scratch / "main", scratch / "sock")
        try:
            sql = LIST_SQL if count else LIST_SQL.replace(COUNT, "NULL")
            out = sh(PG_BIN / "psql", "-X", "-At", "-h", scratch / "sock", "-U", "postgres", "-d", "bench", "-c", sql)
        finally:
            proc.terminate()
            proc.wait()
        seconds = time.perf_counter() - start
        shutil.rmtree(scratch)
        return seconds, {(s, t): n for s, t, n in json.loads(out.stdout)}

    results: dict[str, list[float]] = {"ours": [], "anchor": [], "ours_catalog": [], "anchor_catalog": []}
    for i in range(rounds):
        for name, fn, count in (
            ("anchor", anchor, True),
            ("ours", ours, True),
            ("anchor_catalog", anchor, False),
            ("ours_catalog", ours, False),
        ):
            warm_page_cache(*chunks)
            seconds, counts = fn(count)
            want = SCALE * 100_000 if count else None
            assert counts[("public", "pgbench_accounts")] == want, f"{name}: wrong count {counts}"
            results[name].append(seconds)
            log(f"round {i + 1}: {name} {seconds:.2f} s")
    rows = [
        Row(
            f"first table listing with exact row counts, ~{SCALE * 15} MB cluster, s (best of {rounds})",
            min(results["ours"]),
            min(results["anchor"]),
            "s",
            "<= 1.0",
        ),
        Row(
            f"first table listing, catalogs only (--no-count), s (best of {rounds})",
            min(results["ours_catalog"]),
            min(results["anchor_catalog"]),
            "s",
            "<= 0.5",
        ),
    ]
    report("items", "./run bench items", rows, {"seconds": results, "scale": SCALE, "image_bytes": img.stat().st_size})
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

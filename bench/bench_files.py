"""File-level recovery: files copied out of a backed-up disk by ``bootback extract`` (through the repository's
chunks, partitions and filesystem parsers) against e2fsprogs' ``debugfs`` dumping the same files from the raw
image the backup was made of.

Input: an ext4 image (1 GiB) holding one 512 MiB file of random bytes and a tree of small files copied from
the host (Python's and Perl's libraries, about 110 MB in 5,500 files), built once with ``mkfs.ext4 -d``,
backed up into a fresh repository.
Both tools read their input from the page cache and write to /dev/shm; each output is checked against the
source. Run: ``./run bench files``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

from bench._common import WORK, MiB, Row, log, python, random_file, report, sh, warm_page_cache

BIG = 512 * MiB
# Many small files, as a user restoring a folder meets them (~110 MB, ~5,500 files on Debian 12).
TREE_SOURCES = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/share/perl")
OUT = Path("/dev/shm/bootback-bench-files")


def bootback() -> str:
    return str(Path(python()).with_name("bootback"))


def build_input() -> tuple[Path, Path]:
    img = WORK / "inputs" / "files-ext4.raw"
    src = WORK / "inputs" / "files-src"
    if img.exists() and src.exists():
        return img, src
    shutil.rmtree(src, ignore_errors=True)
    (src / "tree").mkdir(parents=True)
    random_file(src / "big.bin", BIG)
    for d in TREE_SOURCES:
        if Path(d).is_dir():
            sh("cp", "-a", d, src / "tree" / Path(d).name)
    for link in [p for p in (src / "tree").rglob("*") if p.is_symlink()]:
        link.unlink()  # debugfs rdump and our tar treat symlinks differently: compare regular files only
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    sh("mkfs.ext4", "-q", "-F", "-d", src, tmp, "1024M")
    tmp.replace(img)
    return img, src


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench files")
    ap.add_argument("--quick", action="store_true", help="one round (a smoke test, not a result)")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else 3
    img, src = build_input()
    repo = WORK / "files" / "repo"
    shutil.rmtree(repo.parent, ignore_errors=True)
    repo.parent.mkdir(parents=True)
    sh(bootback(), "init", repo, "--encryption", "none")
    sh(bootback(), "backup", repo, "--vm", "flr", img)
    big_sum = hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()
    tree_sum = tree_digest(src / "tree")
    tree_bytes = int(sh("du", "-sb", "--apparent-size", src / "tree").stdout.split()[0])
    chunks = [p for p in (repo / "chunks").rglob("*") if p.is_file()]

    def ours_big() -> float:
        return timed(lambda: sh(bootback(), "extract", repo, "flr", "/disk/big.bin", "-o", OUT / "big.bin"))

    def anchor_big() -> float:
        return timed(lambda: sh("debugfs", "-R", f"dump /big.bin {OUT / 'big.bin'}", img))

    def ours_tree() -> float:
        def run() -> None:
            sh(bootback(), "extract", repo, "flr", "/disk/tree", "-o", OUT / "tree.tar")
            sh("tar", "-xf", OUT / "tree.tar", "-C", OUT)

        return timed(run)

    def anchor_tree() -> float:
        return timed(lambda: sh("debugfs", "-R", f"rdump /tree {OUT}", img))

    results: dict[str, list[float]] = {"ours_big": [], "anchor_big": [], "ours_tree": [], "anchor_tree": []}
    for i in range(rounds):
        for name, fn, check in (
            ("anchor_big", anchor_big, "big"),
            ("ours_big", ours_big, "big"),
            ("anchor_tree", anchor_tree, "tree"),
            ("ours_tree", ours_tree, "tree"),
        ):
            shutil.rmtree(OUT, ignore_errors=True)
            OUT.mkdir(parents=True)
            warm_page_cache(img, *chunks)
            seconds = fn()
            if check == "big":
                assert hashlib.sha256((OUT / "big.bin").read_bytes()).hexdigest() == big_sum, f"{name}: wrong bytes"
            else:
                assert tree_digest(OUT / "tree") == tree_sum, f"{name}: wrong tree"
            results[name].append(seconds)
            log(f"round {i + 1}: {name} {seconds:.2f} s")
    shutil.rmtree(OUT, ignore_errors=True)
    files = sum(1 for p in (src / "tree").rglob("*") if p.is_file())
    rows = [
        Row(
            "512 MiB file out of the backup, MB/s (best of 3)",
            BIG / 1e6 / min(results["ours_big"]),
            BIG / 1e6 / min(results["anchor_big"]),
            "MB/s",
        ),
        Row(
            f"a folder of {files} files ({tree_bytes / 1e6:.0f} MB), files/s",
            files / min(results["ours_tree"]),
            files / min(results["anchor_tree"]),
            "files/s",
        ),
    ]
    report(
        "files",
        "./run bench files",
        rows,
        {
            "seconds": results,
            "tree_files": files,
            "tree_bytes": tree_bytes,
            "debugfs": sh("debugfs", "-V").stderr.strip(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

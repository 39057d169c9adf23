"""The repository through the `bootback` CLI, with images made by qemu-img, and failures that must lose nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BOOTBACK = [sys.executable, "-m", "appliance"]
MiB = 1024 * 1024


def run(*args: str | Path, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BOOTBACK, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)
    if ok and proc.returncode != 0:
        raise AssertionError(f"bootback {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 MiB disk: random and text-like regions, holes of zeros, an odd tail."""
    path = tmp_path_factory.mktemp("img") / "disk.raw"
    rnd = random.Random(42)
    with open(path, "wb") as f:
        for i in range(24):
            if i % 4 == 1:
                f.write(bytes(MiB))
            elif i % 4 == 2:
                f.write((b"bootback text-like block %d\n" % i) * (MiB // 27) + bytes(MiB % 27))
            else:
                f.write(rnd.randbytes(MiB))
        f.write(rnd.randbytes(5000))
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    run("init", tmp_path / "repo", "--chunk-size", "256K")
    return tmp_path / "repo"


def restore_bytes(repo: Path, ref: str, disk: str, out: Path) -> bytes:
    run("restore", repo, ref, "--disk", disk, "-o", out)
    return out.read_bytes()


@pytest.mark.parametrize(
    "fmt,opts",
    [
        ("vmdk", "subformat=monolithicFlat"),
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("qcow2", ""),
        ("vpc", "subformat=fixed"),
        ("vpc", "subformat=dynamic"),
        ("vhdx", ""),
    ],
)
def test_backup_every_source_format_restores_bit_exact(
    repo: Path, raw_image: Path, tmp_path: Path, fmt: str, opts: str
) -> None:
    ext = {"vpc": "vhd"}.get(fmt, fmt)
    image = tmp_path / f"src.{ext}"
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if opts:
        cmd += ["-o", opts]
    subprocess.run([*cmd, str(raw_image), str(image)], check=True, capture_output=True)
    out = json.loads(run("backup", repo, "--vm", "vm1", image, "--json").stdout)
    disk = out["disks"][0]
    restored = restore_bytes(repo, "vm1@latest", disk["name"], tmp_path / "out.raw")
    original = raw_image.read_bytes()
    if fmt == "vpc":
        # VHD rounds the size up to a CHS geometry (qemu and the footer's current_size may differ by a
        # sector); the guest-visible bytes are the original followed by zeros.
        assert len(restored) >= len(original) and restored[len(original) :].count(0) == len(restored) - len(original)
        restored = restored[: len(original)]
    else:
        expected = tmp_path / "expected.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(expected)], check=True)
        assert disk["size"] == expected.stat().st_size
        original = expected.read_bytes()
    assert restored == original
    if fmt == "vmdk":
        assert disk["adapter"] == "ide"  # qemu-img writes ddb.adapterType = "ide"


def test_vm_folder_with_vmx(repo: Path, raw_image: Path, tmp_path: Path) -> None:
    folder = tmp_path / "web01"
    folder.mkdir()
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            str(raw_image),
            str(folder / "web01.vmdk"),
        ],
        check=True,
    )
    subprocess.run(
        ["qemu-img", "create", "-f", "vmdk", str(folder / "web01_1.vmdk"), "8M"], check=True, capture_output=True
    )
    (folder / "web01.vmx").write_text(
        '.encoding = "UTF-8"\ndisplayName = "web01"\nscsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\n'
        'scsi0:0.fileName = "web01.vmdk"\nscsi0:1.present = "TRUE"\nscsi0:1.fileName = "web01_1.vmdk"\n'
        'ide1:0.present = "TRUE"\nide1:0.deviceType = "cdrom-image"\nide1:0.fileName = "x.iso"\n'
    )
    out = json.loads(run("backup", repo, "--vm", "web01", folder, "--json").stdout)
    assert [d["name"] for d in out["disks"]] == ["web01.vmdk", "web01_1.vmdk"]
    assert out["has_vmx"]
    restored = restore_bytes(repo, "web01@latest", "web01.vmdk", tmp_path / "o1")
    original = raw_image.read_bytes()  # VMDK pads to whole sectors with zeros
    assert restored[: len(original)] == original and restored[len(original) :] == bytes(len(restored) - len(original))
    assert len(restored) % 512 == 0 and len(restored) - len(original) < 512
    assert restore_bytes(repo, "web01@latest", "web01_1.vmdk", tmp_path / "o2") == bytes(8 * MiB)
    points = json.loads(run("points", repo, "--vm", "web01", "--json").stdout)
    assert len(points) == 1 and points[0]["disks"][1]["size"] == 8 * MiB


def test_stdin_and_incremental_stats(repo: Path, raw_image: Path, tmp_path: Path) -> None:
    data = raw_image.read_bytes()
    with open(raw_image, "rb") as stdin:
        first = json.loads(run("backup", repo, "--vm", "s", "-", "--name", "sda", "--json", stdin=stdin).stdout)
    changed = bytearray(data)
    changed[3 * MiB + 5] ^= 1  # ~1 chunk of 96 changes
    (tmp_path / "c.raw").write_bytes(changed)
    second = json.loads(run("backup", repo, "--vm", "s", tmp_path / "c.raw", "--json").stdout)
    assert first["stats"]["bytes_read"] == len(data)
    assert second["stats"]["chunks_new"] == 1
    assert second["stats"]["bytes_new"] == 256 * 1024
    pts = json.loads(run("points", repo, "--json").stdout)
    assert [p["vm"] for p in pts] == ["s", "s"]
    assert restore_bytes(repo, f"s@{first['id']}", "sda", tmp_path / "o") == data


def test_bad_input_errors_leave_repository_intact(repo: Path, raw_image: Path, tmp_path: Path) -> None:
    run("backup", repo, "--vm", "good", raw_image)
    before = tree_hash(repo)
    bogus = tmp_path / "junk.qcow2"
    bogus.write_bytes(b"not an image at all" * 100)
    p = run("backup", repo, "--vm", "x", bogus, ok=False)
    assert p.returncode == 20 and "unknown format" in p.stderr
    truncated = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_image), str(truncated)], check=True)
    os.truncate(truncated, truncated.stat().st_size // 2)
    p = run("backup", repo, "--vm", "x", truncated, ok=False)
    assert p.returncode == 20 and str(truncated) in p.stderr
    p = run("backup", repo, "--vm", "x", tmp_path / "missing.img", ok=False)
    assert p.returncode == 20 and "does not exist" in p.stderr
    p = run("points", tmp_path, ok=False)
    assert p.returncode == 11 and "not a bootback repository" in p.stderr
    p = run("restore", repo, "good@nope", "-o", tmp_path / "o", ok=False)
    assert p.returncode == 14 and "no restore point good@nope" in p.stderr
    p = run("init", tmp_path / "r2", "--chunk-size", "3M", ok=False)
    assert p.returncode == 2 and "power of two" in p.stderr
    cfg = json.loads((repo / "config.json").read_text())
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "config.json").write_text(json.dumps({**cfg, "format": 3}))
    p = run("points", tmp_path / "newer", ok=False)
    assert p.returncode == 12 and "newer" in p.stderr
    assert tree_hash(repo) == before
    assert run("verify", repo).returncode == 0


def test_corrupt_chunk_verify_names_damaged_point(repo: Path, raw_image: Path, tmp_path: Path) -> None:
    out = json.loads(run("backup", repo, "--vm", "a", raw_image, "--json").stdout)
    files = sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())
    victim = files[len(files) // 2]
    os.chmod(victim, 0o644)
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF
    victim.write_bytes(bytes(blob))
    p = run("verify", repo, "--json", ok=False)
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["ok"] is False and list(report["damaged_points"]) == [f"a@{out['id']}"]
    assert victim.name in report["bad_chunks"]
    p = run("restore", repo, "a@latest", "-o", tmp_path / "o", ok=False)
    assert p.returncode == 15 and victim.name in p.stderr


@pytest.mark.slow
def test_sigkill_during_backup_leaves_repository_consistent(repo: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.write(random.Random(1).randbytes(96 * MiB))
    run("backup", repo, "--vm", "base", big)
    base_digest = hashlib.sha256(big.read_bytes()).hexdigest()
    (base,) = json.loads(run("points", repo, "--json").stdout)
    for delay in (0.05, 0.2, 0.5, 0.9):
        with open(big, "r+b") as f:  # new content so the backup has real work to do
            f.seek(int(delay * 10) * MiB)
            f.write(random.Random(delay).randbytes(48 * MiB))
        proc = subprocess.Popen(
            [*BOOTBACK, "backup", str(repo), "--vm", "victim", str(big)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        points = json.loads(run("points", repo, "--json").stdout)
        assert base in points, f"the committed base point is gone after SIGKILL at {delay}s"
        assert all(p["vm"] in ("base", "victim") for p in points)
        assert run("verify", repo).returncode == 0
        for p in points:  # every visible point restores whole
            assert run("restore", repo, f"{p['vm']}@{p['id']}", "-o", tmp_path / "o").returncode == 0
    restored = restore_bytes(repo, f"base@{base['id']}", base["disks"][0]["name"], tmp_path / "base.raw")
    assert hashlib.sha256(restored).hexdigest() == base_digest, "the base point no longer restores its bytes"
    p = run("prune", repo, "--vm", "base", "--keep", "1", "--json")
    assert json.loads(p.stdout)["deleted_points"] == []
    assert not any((repo / "tmp").iterdir())  # crashed writers' leftovers were collected


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_during_backup_is_a_clear_error(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        run("init", mnt / "repo", "--chunk-size", "64K")
        small = tmp_path / "small.raw"
        small.write_bytes(random.Random(2).randbytes(MiB))
        run("backup", mnt / "repo", "--vm", "fits", small)
        before = run("points", mnt / "repo", "--json").stdout
        big = tmp_path / "big.raw"
        big.write_bytes(random.Random(3).randbytes(16 * MiB))
        p = run("backup", mnt / "repo", "--vm", "toobig", big, ok=False)
        assert p.returncode == 30 and "no space left" in p.stderr
        assert run("points", mnt / "repo", "--json").stdout == before
        assert run("verify", mnt / "repo").returncode == 0
        assert run("restore", mnt / "repo", "fits@latest", "-o", tmp_path / "o").returncode == 0
        assert (tmp_path / "o").read_bytes() == small.read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_concurrent_backups_and_a_reader_meanwhile(repo: Path, raw_image: Path, tmp_path: Path) -> None:
    """Two backups of overlapping disks at once (shared chunks staged by both), while a reader reads an
    existing restore point: every point restores bit-exact and the repository verifies."""
    from appliance.repo import Repository

    run("backup", repo, "--vm", "base", raw_image)
    variants = []
    for k in range(2):
        data = bytearray(raw_image.read_bytes())
        data[k * MiB : k * MiB + 1000] = bytes([k + 7]) * 1000  # mostly the same chunks as the base
        path = tmp_path / f"v{k}.raw"
        path.write_bytes(bytes(data))
        variants.append(path)
    procs = [
        subprocess.Popen(
            [*BOOTBACK, "backup", str(repo), "--vm", f"vm{k}", str(p), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, p in enumerate(variants)
    ]
    reader_repo = Repository.open(repo)
    point = reader_repo.restore_point("base", "latest")
    reader = reader_repo.open_disk(point, point.disks[0].name)
    expected = raw_image.read_bytes()
    rnd = random.Random(9)
    reads = 0
    while any(p.poll() is None for p in procs) or reads < 50:
        off = rnd.randrange(0, len(expected) - 4096)
        assert reader.read(off, 4096) == expected[off : off + 4096]
        reads += 1
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for k, path in enumerate(variants):
        assert restore_bytes(repo, f"vm{k}@latest", f"v{k}.raw", tmp_path / f"r{k}") == path.read_bytes()
    assert "repository OK" in run("verify", repo).stdout
    assert not any((repo / "tmp").iterdir()), "a writer left its temp directory behind"


def test_damaged_manifest_refused_by_restore_and_reported_by_verify(repo: Path, tmp_path: Path) -> None:
    """One flipped bit in a restore point file: restore refuses it naming the point (exit 15) and leaves no
    output; verify reports the damaged manifest and exits 1; listing another VM's points still works."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(random.Random(5).randbytes(3 * MiB + 100))
    out = json.loads(run("backup", repo, "--vm", "a", disk, "--json").stdout)
    run("backup", repo, "--vm", "b", disk)
    victim = repo / "points" / "a" / f"{out['id']}.point"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) - 40] ^= 0x10  # inside the chunk lists
    victim.write_bytes(bytes(blob))
    p = run("restore", repo, "a@latest", "-o", tmp_path / "o", ok=False)
    assert p.returncode == 15 and f"a@{out['id']}" in p.stderr and "damaged" in p.stderr, p.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    p = run("verify", repo, ok=False)
    assert p.returncode == 1 and f"DAMAGED MANIFEST a@{out['id']}" in p.stdout and "repository DAMAGED" in p.stdout
    assert restore_bytes(repo, "b@latest", "d.raw", tmp_path / "b.raw") == disk.read_bytes()
    p = run("prune", repo, "--vm", "b", "--keep", "1", ok=False)  # garbage collection cannot know a's chunks
    assert p.returncode == 15 and f"a@{out['id']}" in p.stderr


def test_points_lists_the_others_and_a_damaged_summary_as_damaged(repo: Path, tmp_path: Path) -> None:
    """A flipped bit in the summary of a's newest point: 'points' still lists every other point (exit 0) and a
    DAMAGED line with the reason in its place; 'latest' of a is refused (exit 15) instead of restoring the
    older point, which still restores when named; prune refuses and deletes nothing."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(random.Random(6).randbytes(MiB + 100))
    a_old = json.loads(run("backup", repo, "--vm", "a", disk, "--json").stdout)["id"]
    a_new = json.loads(run("backup", repo, "--vm", "a", disk, "--json").stdout)["id"]
    b = json.loads(run("backup", repo, "--vm", "b", disk, "--json").stdout)["id"]
    victim = repo / "points" / "a" / f"{a_new}.point"
    blob = bytearray(victim.read_bytes())
    blob[56 + int.from_bytes(blob[16:24], "big") - 3] ^= 0x10  # the summary's last stored bytes (56: its header)
    victim.write_bytes(bytes(blob))

    p = run("points", repo)
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"a@{a_old}", f"a@{a_new}", f"b@{b}"], p.stdout
    assert lines[1].startswith(f"a@{a_new}  DAMAGED  restore point a@{a_new} (summary): "), lines[1]
    assert "1 restore point file(s) DAMAGED" in p.stderr and "bootback verify" in p.stderr
    listed = json.loads(run("points", repo, "--vm", "a", "--json").stdout)
    assert [(e["id"], e["damaged"]) for e in listed] == [(a_old, False), (a_new, True)]
    assert set(listed[1]) == {"vm", "id", "damaged", "error"} and "(summary)" in listed[1]["error"]

    p = run("restore", repo, "a", "-o", tmp_path / "o", ok=False)
    assert p.returncode == 15 and f"restore point a@{a_new} (summary)" in p.stderr, p.stderr
    assert f"name an older point explicitly, e.g. a@{a_old}" in p.stderr and not (tmp_path / "o").exists()
    assert restore_bytes(repo, f"a@{a_old}", "d.raw", tmp_path / "a.raw") == disk.read_bytes()
    before = tree_hash(repo)
    p = run("prune", repo, "--vm", "a", "--keep", "1", ok=False)
    assert p.returncode == 15 and f"a@{a_new}" in p.stderr and "nothing was deleted" in p.stderr, p.stderr
    assert tree_hash(repo) == before


def test_restore_failure_leaves_no_partial_file_and_keeps_an_older_one(repo: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(random.Random(6).randbytes(4 * MiB))
    run("backup", repo, "--vm", "a", disk)
    files = sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())
    victim = files[-1]
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF
    os.chmod(victim, 0o600)
    victim.write_bytes(bytes(blob))
    target = tmp_path / "restored.raw"
    p = run("restore", repo, "a@latest", "-o", target, ok=False)
    assert p.returncode == 15 and victim.name in p.stderr
    assert not target.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["d.raw", "repo"]
    target.write_bytes(b"an older restore")
    assert run("restore", repo, "a@latest", "-o", target, ok=False).returncode == 15
    assert target.read_bytes() == b"an older restore"


def test_restore_to_dev_null_a_pipe_and_stdout(repo: Path, tmp_path: Path) -> None:
    data = bytearray(random.Random(7).randbytes(2 * MiB + 5))
    data[256 * 1024 : 768 * 1024] = bytes(512 * 1024)  # zero chunks: written as zeros where seeking cannot work
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(data))
    run("backup", repo, "--vm", "a", disk)
    p = run("restore", repo, "a@latest", "-o", "/dev/null")
    assert p.returncode == 0 and p.stderr == "" and "to /dev/null" in p.stdout
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*BOOTBACK, "restore", str(repo), "a@latest", "-o", str(fifo)], stderr=subprocess.PIPE)
    with open(fifo, "rb") as f:
        assert f.read() == bytes(data)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    stdout = subprocess.run([*BOOTBACK, "restore", str(repo), "a@latest", "-o", "-"], capture_output=True, check=True)
    assert stdout.stdout == bytes(data)
    p = run("restore", repo, "a@latest", "-o", tmp_path / "no" / "such" / "dir", ok=False)
    assert p.returncode == 2 and "cannot write" in p.stderr and "Traceback" not in p.stderr


def test_new_repository_is_private_and_an_old_readable_one_still_works(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    run("init", repo, "--chunk-size", "64K")
    disk = tmp_path / "d.raw"
    disk.write_bytes(random.Random(8).randbytes(MiB))
    run("backup", repo, "--vm", "a", disk)
    modes = {p.relative_to(repo).as_posix(): p.stat().st_mode & 0o777 for p in [repo, *repo.rglob("*")]}
    dirs = {k: m for k, m in modes.items() if (repo / k).is_dir()}
    files = {k: m for k, m in modes.items() if (repo / k).is_file()}
    assert set(dirs.values()) == {0o700}, dirs
    assert set(files.values()) == {0o600}, files
    assert any(k.startswith("chunks/") for k in files) and any(k.startswith("points/") for k in files)
    for p in [repo, *repo.rglob("*")]:  # as an older bootback left it: world-readable, read-only chunks
        os.chmod(p, 0o755 if p.is_dir() else (0o444 if "chunks" in p.parts else 0o644))
    run("backup", repo, "--vm", "a", disk)
    assert restore_bytes(repo, "a@latest", "d.raw", tmp_path / "o") == disk.read_bytes()
    assert run("prune", repo, "--vm", "a", "--keep", "1").returncode == 0
    assert "repository OK" in run("verify", repo).stdout

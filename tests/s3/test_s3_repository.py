"""Repositories on S3 (``s3://BUCKET/PREFIX``) against a real Ceph RADOS Gateway: the real CLI, the real daemon
and real NFS clients; the gateway's own counters say what reached it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, StorageUnavailableError
from appliance.repo import Repository
from tests.daemon_process import ROOT, DaemonProcess, free_port
from tests.s3 import packed

MiB = 1 << 20


def bootback(*args: str | Path, ok: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)],
        capture_output=True,
        input=stdin,
        timeout=300,
        cwd=ROOT,
    )
    if ok and p.returncode != 0:
        raise AssertionError(f"bootback {args} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def disk(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def keys(rgw, location: str, prefix: str) -> list[str]:  # noqa: ANN001
    bucket, _, root = location[len("s3://") :].partition("/")
    found = rgw.client().list_objects_v2(Bucket=bucket, Prefix=f"{root}/{prefix}").get("Contents", [])
    return [o["Key"] for o in found]


LAYOUTS = pytest.mark.parametrize("layout", ["packs", "loose"])  # loose: init --no-packs, one object per chunk


@LAYOUTS
def test_backup_restore_bit_exact_and_dedup_puts_only_changed_chunks(
    rgw, s3_repo: str, tmp_path: Path, layout: str
) -> None:
    first = os.urandom(8 * MiB)
    second = bytearray(first)
    second[3 * MiB + 5 : 3 * MiB + 9] = b"XXXX"  # one chunk changes
    bootback("init", s3_repo, *(["--no-packs"] if layout == "loose" else []))
    before = rgw.counters()
    bootback("backup", s3_repo, "--vm", "vm1", disk(tmp_path, "d.raw", first))
    after = rgw.counters()
    # packs: one pack (8 MiB < 16) and its index; loose: 8 chunks. Then the point and the backup's lease.
    assert after["put"] - before["put"] == (1 + 1 if layout == "packs" else 8) + 1 + 1
    assert after["put_b"] - before["put_b"] >= 8 * MiB  # random data: every chunk went up whole
    bootback("backup", s3_repo, "--vm", "vm1", disk(tmp_path, "d.raw", bytes(second)))
    again = rgw.counters()
    # the changed chunk (alone in a new pack, with a new index), the point, the lease
    assert again["put"] - after["put"] == (1 + 1 if layout == "packs" else 1) + 1 + 1
    assert MiB <= again["put_b"] - after["put_b"] < MiB + 64 * 1024  # one chunk's bytes, not the disk's
    if layout == "packs":
        assert len(keys(rgw, s3_repo, "packs/")) == 2 and len(keys(rgw, s3_repo, "index/")) == 2
        assert keys(rgw, s3_repo, "chunks/") == []
        assert len(packed.records(Repository.open(s3_repo))) == 9
    else:
        assert len(keys(rgw, s3_repo, "chunks/")) == 9
        assert keys(rgw, s3_repo, "packs/") == [] and keys(rgw, s3_repo, "index/") == []
    assert keys(rgw, s3_repo, "locks/") == []  # leases are removed when backups end

    points = bootback("points", s3_repo, "--vm", "vm1").stdout.decode().split()
    old, new = [w for w in points if w.startswith("vm1@")]
    for ref, want in ((old, first), (new, bytes(second))):
        out = tmp_path / "out.raw"
        bootback("restore", s3_repo, ref, "-o", out)
        assert out.read_bytes() == want
    assert b"repository OK" in bootback("verify", s3_repo).stdout


@LAYOUTS
def test_deleted_or_corrupted_chunk_is_an_integrity_error_naming_it(
    rgw, s3_repo: str, tmp_path: Path, layout: str
) -> None:
    bucket, root = packed.split(s3_repo)
    client = rgw.client()
    if layout == "loose":
        bootback("init", s3_repo, "--no-packs")
        bootback("backup", s3_repo, "--vm", "vm1", disk(tmp_path, "d.raw", os.urandom(3 * MiB)))
        gone, bad, _ = Repository.open(s3_repo).restore_point("vm1").disks[0].chunks
        client.delete_object(Bucket=bucket, Key=f"{root}/chunks/{gone[:2]}/{gone}")
        blob = bytearray(client.get_object(Bucket=bucket, Key=f"{root}/chunks/{bad[:2]}/{bad}")["Body"].read())
        blob[-10] ^= 0xFF
        client.put_object(Bucket=bucket, Key=f"{root}/chunks/{bad[:2]}/{bad}", Body=bytes(blob))
    else:
        # The first chunk alone in one pack (an earlier backup's), the other two in the next backup's pack: the
        # first pack is deleted, a byte inside the second chunk's object in the other pack is flipped.
        data = os.urandom(3 * MiB)
        bootback("init", s3_repo)
        bootback("backup", s3_repo, "--vm", "early", disk(tmp_path, "e.raw", data[:MiB]))
        bootback("backup", s3_repo, "--vm", "vm1", disk(tmp_path, "d.raw", data))
        repo = Repository.open(s3_repo)
        gone, bad, _ = repo.restore_point("vm1").disks[0].chunks
        where = packed.records(repo)
        assert where[gone].pack != where[bad].pack
        client.delete_object(Bucket=bucket, Key=f"{root}/{where[gone].pack_key}")
        packed.flip_byte(rgw, s3_repo, where[bad], where[bad].length - 10)

    repo = Repository.open(s3_repo)
    reader = repo.open_disk(repo.restore_point("vm1"), "d.raw")
    with pytest.raises(IntegrityError, match=f"chunk {gone} is missing"):
        reader.read(0, 4096)
    with pytest.raises(IntegrityError, match=f"chunk {bad}"):
        reader.read(MiB, 4096)
    out = tmp_path / "restored.raw"
    p = bootback("restore", s3_repo, "vm1", "-o", out, ok=False)
    assert p.returncode == 15 and gone in p.stderr.decode()
    assert not out.exists()  # never a partial file that looks restored
    report = bootback("verify", s3_repo, "--json", ok=False)
    assert report.returncode == 1
    bad_chunks = json.loads(report.stdout)["bad_chunks"]
    assert set(bad_chunks) == {gone, bad} and "missing" in bad_chunks[gone], bad_chunks


@pytest.mark.parametrize(
    ("change", "expect", "code"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "access denied", 16),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, "access denied", 16),
        ({"bucket": "no-such-bucket-here"}, "bucket 'no-such-bucket-here' does not exist", 16),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "did not answer", 16),
        ({"AWS_PROFILE": "no-such-profile"}, "The config profile (no-such-profile) could not be found", 3),
        ({"AWS_ENDPOINT_URL": "not-a-url"}, "Invalid endpoint: not-a-url", 3),
    ],
)
def test_wrong_credentials_missing_bucket_or_endpoint_give_one_clear_line(
    rgw, s3_repo: str, monkeypatch: pytest.MonkeyPatch, change: dict, expect: str, code: int
) -> None:
    location = s3_repo
    for name, value in change.items():
        if name == "bucket":
            location = f"s3://{value}/repo"
        else:
            monkeypatch.setenv(name, value)
    for command in (["points", location], ["init", location + "2"]):
        p = bootback(*command, ok=False)
        err = p.stderr.decode()
        assert p.returncode == code, err
        assert len(err.strip().splitlines()) == 1 and expect in err, err
        assert "bootback-test-secret" not in err and "not-the-secret" not in err


def test_gateway_stopped_mid_backup_and_mid_read(rgw, s3_repo: str, tmp_path: Path) -> None:
    """Clear errors; nothing incomplete becomes visible; everything works again once the gateway is back."""
    bootback("init", s3_repo)  # with packs: a pack goes up once 16 MiB of new chunks have gathered
    data = os.urandom(24 * MiB)
    bootback("backup", s3_repo, "--vm", "kept", disk(tmp_path, "d.raw", data[: 4 * MiB]))
    backup = subprocess.Popen(
        [sys.executable, "-m", "appliance", "backup", s3_repo, "--vm", "cut", "-", "--name", "d.raw"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        backup.stdin.write(data[: 20 * MiB])  # 4 chunks deduplicated, 16 new: one full pack
        backup.stdin.flush()
        deadline = time.monotonic() + 30
        while len(keys(rgw, s3_repo, "packs/")) < 2:  # kept's and the first of cut's
            assert time.monotonic() < deadline and backup.poll() is None, "the backup stored no pack"
            time.sleep(0.1)
        repo = Repository.open(s3_repo)
        reader = repo.open_disk(repo.restore_point("kept"), "d.raw")
        assert reader.read(0, 4096) == data[:4096]
        rgw.stop()
        try:
            backup.stdin.write(data[20 * MiB :])
            backup.stdin.close()
        except BrokenPipeError:
            pass
        err = backup.stderr.read().decode()
        assert backup.wait(120) == 16, err
        assert len(err.strip().splitlines()) == 1 and "did not answer" in err, err
        with pytest.raises(StorageUnavailableError, match=r"chunk [0-9a-f]{64}.*did not answer"):
            reader.read(2 * MiB, 4096)  # not read before, not in any cache: needs the gateway
        assert reader.read(0, 4096) == data[:4096]  # what was read stays served from memory
    finally:
        if backup.poll() is None:
            backup.kill()
        rgw.start()
    listing = bootback("points", s3_repo).stdout.decode()
    assert "kept@" in listing and "cut@" not in listing
    assert len(keys(rgw, s3_repo, "index/")) == 1  # kept's: no index names the cut backup's stored pack
    assert b"repository OK" in bootback("verify", s3_repo).stdout


def test_instant_recovery_over_nfs_from_a_bucket_only_point(rgw, s3_repo: str, tmp_path: Path) -> None:
    """The daemon serves restore points that live only in the bucket: an NFS client reads the extent bit-exact;
    with the gateway gone, what was read is still served from the local read cache, a disk never read fails with
    an I/O error, and the daemon goes on serving."""
    data = bytearray(os.urandom(6 * MiB))
    data[2 * MiB : 3 * MiB] = bytes(MiB)  # an unstored all-zero chunk in the middle
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "web", disk(tmp_path, "web.raw", bytes(data)))
    bootback("backup", s3_repo, "--vm", "db", disk(tmp_path, "db.raw", os.urandom(2 * MiB)))
    warm_data = os.urandom(5 * MiB)
    bootback("backup", s3_repo, "--vm", "warm", disk(tmp_path, "warm.raw", warm_data))
    nfs_port, mount_port = free_port(), free_port()
    ports = ("--bind", "127.0.0.1", "--nfs-port", str(nfs_port), "--mount-port", str(mount_port))
    # No chunks kept in memory: what survives the gateway below comes from the read cache on disk.
    daemon = DaemonProcess(
        "unused", tmp_path / "state", *ports, "--portmap-port", "0", env={"BOOTBACK_CHUNK_CACHE": "0"}
    )
    daemon.repo = s3_repo  # the daemon takes the location as it is, not as a path
    daemon.start()

    def extent(vm: str, *extra: str) -> str:
        doc = daemon.publish(vm, mode="sandbox", extra=extra)
        assert isinstance(doc, dict)
        return f"{doc['nfs_url']}/{doc['disks'][0]['extent']}?nfsport={nfs_port}&mountport={mount_port}"

    try:
        web, db, warm = extent("web"), extent("db"), extent("warm", "--prefetch")
        assert nfs_cat(web).stdout == bytes(data)
        deadline = time.monotonic() + 60
        while True:  # publish --prefetch warms the whole disk in the background, no client reading it
            (session,) = [s for s in json.loads(daemon.cli("sessions", "--json").stdout) if s["vm"] == "warm"]
            (progress,) = session["prefetch"]
            if not progress["running"]:
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.2)
        assert progress == {"disk": "warm.raw", "chunks": 5, "done": 5, "failed": 0, "running": False}
        rgw.stop()
        assert nfs_cat(warm).stdout == warm_data  # never read before: all of it came local by the prefetch
        assert nfs_cat(web).stdout == bytes(data)  # hydrated: the local tier serves it without the gateway
        failed = nfs_cat(db)
        assert failed.returncode != 0 and len(failed.stdout) < 2 * MiB  # an error, never a short or wrong disk
        assert "did not answer" in daemon.log()
        assert nfs_cat(web).stdout == bytes(data)  # still serving
    finally:
        try:
            rgw.start()
        finally:
            daemon.stop()  # even when the gateway does not come back: no daemon outlives its test
    assert daemon.proc.returncode == 0, daemon.log()[-3000:]


def nfs_cat(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nfs-cat", url], capture_output=True, timeout=120)


def test_leases_keep_prune_and_backups_apart(rgw, s3_repo: str, tmp_path: Path) -> None:
    """Without flock: a running backup's lease holds garbage collection off until it commits; a live collector's
    lease refuses backups with one line; an expired lease (a crashed writer) blocks nothing and is cleaned up;
    young unreferenced chunks outlive the grace period's collection."""
    bucket, _, root = s3_repo[len("s3://") :].partition("/")
    client = rgw.client()
    bootback("init", s3_repo)
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    bootback("backup", s3_repo, "--vm", "a", disk(tmp_path, "a.raw", old))
    bootback("backup", s3_repo, "--vm", "a", disk(tmp_path, "a.raw", new))

    client.put_object(Bucket=bucket, Key=f"{root}/locks/gc.120s", Body=b"{}")  # a collector at work
    p = bootback("backup", s3_repo, "--vm", "b", disk(tmp_path, "b.raw", new), ok=False)
    assert p.returncode == 13 and "garbage collection is running" in p.stderr.decode(), p.stderr
    client.delete_object(Bucket=bucket, Key=f"{root}/locks/gc.120s")
    client.put_object(Bucket=bucket, Key=f"{root}/locks/backup.{'0' * 32}.1s", Body=b"{}")  # crashed long ago
    time.sleep(2)

    # b's disk starts with a's old disk: b deduplicates against the chunks that prune is about to free
    data = old + os.urandom(MiB)
    backup = subprocess.Popen(
        [sys.executable, "-m", "appliance", "backup", s3_repo, "--vm", "b", "-", "--name", "b.raw"],
        stdin=subprocess.PIPE,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    backup.stdin.write(old)
    backup.stdin.flush()
    deadline = time.monotonic() + 30
    while sum(k.startswith(f"{root}/locks/backup.") for k in keys(rgw, s3_repo, "locks/")) < 2:
        assert time.monotonic() < deadline, "the backup took no lease"
        time.sleep(0.1)
    puts = rgw.counters()["put"]
    env = {**os.environ, "BOOTBACK_S3_GC_GRACE_SECONDS": "0"}
    prune = subprocess.Popen(
        [sys.executable, "-m", "appliance", "prune", s3_repo, "--vm", "a", "--keep", "1", "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
    )
    while rgw.counters()["put"] == puts:  # the backup writes nothing now (deduplicated): this is prune's lease
        assert time.monotonic() < deadline + 30 and prune.poll() is None, "prune took no lease"
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        prune.wait(6)  # time enough to collect this small repository, if it were allowed to
    assert prune.poll() is None, "garbage collection ran beside a backup"
    backup.stdin.write(data[len(old) :])
    backup.stdin.close()
    assert backup.wait(60) == 0
    assert prune.wait(60) == 0
    report = json.loads(prune.stdout.read())
    assert len(report["deleted_points"]) == 1 and report["deleted_chunks"] == 0  # b now uses the old chunks
    assert keys(rgw, s3_repo, "locks/") == []  # ours released, the crashed writer's expired one removed
    assert b"repository OK" in bootback("verify", s3_repo).stdout
    out = tmp_path / "out.raw"
    bootback("restore", s3_repo, "b", "-o", out)
    assert out.read_bytes() == data

    bootback("backup", s3_repo, "--vm", "c", disk(tmp_path, "c.raw", os.urandom(MiB)))
    bootback("backup", s3_repo, "--vm", "c", disk(tmp_path, "c.raw", os.urandom(MiB)))
    young = json.loads(bootback("prune", s3_repo, "--vm", "c", "--keep", "1", "--json").stdout)
    assert len(young["deleted_points"]) == 1 and young["deleted_chunks"] == 0  # within the default grace period


def test_file_level_recovery_from_a_bucket(s3_repo: str, tmp_path: Path) -> None:
    """``files`` and ``extract`` read a file inside a backed-up disk straight from the bucket."""
    image = tmp_path / "fat.img"
    subprocess.run(["mkfs.fat", "-C", str(image), "8192"], check=True, capture_output=True)
    note = tmp_path / "hello.txt"
    note.write_bytes(b"recovered from object storage\n")
    subprocess.run(["mcopy", "-i", str(image), str(note), "::hello.txt"], check=True, capture_output=True)
    bootback("init", s3_repo)
    bootback("backup", s3_repo, "--vm", "files", image)
    listing = bootback("files", s3_repo, "files", "/disk").stdout.decode()
    assert "HELLO.TXT" in listing and " 30 " in listing, listing
    out = tmp_path / "out.txt"
    bootback("extract", s3_repo, "files", "/disk/hello.txt", "-o", out)
    assert out.read_bytes() == note.read_bytes()

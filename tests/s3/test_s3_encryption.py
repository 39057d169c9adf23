"""An encrypted repository in a bucket (issue 11): what leaves the building is ciphertext. Against the real Ceph
RADOS Gateway (``rgw``), with the real CLI; every object is fetched back with boto3 and searched."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import zstandard

from appliance.repo import Repository
from appliance.repo.keys import KeySource
from tests.daemon_process import ROOT
from tests.s3 import packed

MARKER = b"bootback-s3-encryption-marker-93d0"
MiB = 1 << 20


def bootback(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, timeout=300, cwd=ROOT)
    if ok and p.returncode != 0:
        raise AssertionError(f"bootback {args} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def bucket_objects(rgw, location: str) -> dict[str, bytes]:  # noqa: ANN001
    """Every object under the repository's prefix, by key, as the storage holds it."""
    bucket, _, root = location[len("s3://") :].partition("/")
    client = rgw.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{root}/")
    return {
        o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for page in pages
        for o in page.get("Contents", [])
    }


def holds_marker(blob: bytes) -> bool:
    if MARKER in blob:
        return True
    dctx, start = zstandard.ZstdDecompressor(), blob.find(b"\x28\xb5\x2f\xfd")
    while start != -1:
        try:
            if MARKER in dctx.decompress(blob[start:], max_output_size=8 * MiB):
                return True
        except zstandard.ZstdError:
            pass
        start = blob.find(b"\x28\xb5\x2f\xfd", start + 1)
    return False


def test_encrypted_bucket_holds_no_plaintext_and_refuses_tampering(rgw, s3_repo: str, tmp_path: Path) -> None:  # noqa: ANN001
    rnd = random.Random(5)
    data = bytearray(rnd.randbytes(5 * MiB))
    for at in range(1000, len(data) - MiB, MiB):
        data[at : at + len(MARKER)] = MARKER
    data[3 * MiB : 4 * MiB] = (MARKER * (MiB // len(MARKER) + 1))[:MiB]  # compressible: zstd keeps one copy
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(data))
    key = tmp_path / "bucket.key"
    bootback("init", s3_repo, "--encryption", "aes-256-gcm", "--key-file", key)
    bootback("backup", s3_repo, "--vm", "vm1", "--vmx", _vmx(tmp_path), image, "--key-file", key)

    stored = bucket_objects(rgw, s3_repo)
    packs = [k for k in stored if "/packs/" in k]
    indexes = [k for k in stored if "/index/" in k]
    assert len(packs) == 1 and len(indexes) == 1 and any("/points/vm1/" in k for k in stored), sorted(stored)
    assert [k for k in stored if "/chunks/" in k] == []  # new S3 repositories pack their chunks
    assert [k for k, blob in stored.items() if holds_marker(blob)] == []

    bootback("restore", s3_repo, "vm1", "-o", tmp_path / "out.raw", "--key-file", key)
    assert (tmp_path / "out.raw").read_bytes() == bytes(data)
    p = bootback("points", s3_repo, ok=False)
    assert p.returncode == 17 and p.stderr.decode().count("\n") == 1 and b"--key-file" in p.stderr

    # one byte changed in the bucket, inside one chunk's object in the pack: refused by name, never other bytes
    repo = Repository.open(s3_repo, KeySource(key_files=(key,)))
    cid, rec = sorted(packed.records(repo).items())[0]
    packed.flip_byte(rgw, s3_repo, rec, rec.length - 1)
    p = bootback("restore", s3_repo, "vm1", "-o", tmp_path / "bad.raw", "--key-file", key, ok=False)
    assert p.returncode == 15 and f"chunk {cid}".encode() in p.stderr and b"authentication failed" in p.stderr
    assert not (tmp_path / "bad.raw").exists()

    # the pack back whole, one byte of the index changed: the index is refused by name, its chunks read as missing
    bucket, _root = packed.split(s3_repo)
    client = rgw.client()
    client.put_object(Bucket=bucket, Key=packs[0], Body=stored[packs[0]])
    blob = bytearray(stored[indexes[0]])
    blob[len(blob) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=indexes[0], Body=bytes(blob))
    p = bootback("restore", s3_repo, "vm1", "-o", tmp_path / "bad.raw", "--key-file", key, ok=False)
    err = p.stderr.decode()
    assert p.returncode == 15 and "is missing" in err and indexes[0].split("/", 1)[1] in err, err
    assert "authentication failed" in err, err
    assert not (tmp_path / "bad.raw").exists()


def _vmx(tmp_path: Path) -> Path:
    """A .vmx naming the marker: restore points' summaries are encrypted too."""
    vmx = tmp_path / "vm1.vmx"
    vmx.write_text(f'displayName = "{MARKER.decode()}"\nscsi0:0.fileName = "disk.raw"\n')
    return vmx

"""Encrypted repositories (issue 11): the envelope around every object, keyed chunk ids, and the key rules.

Every test uses a real repository on disk, written by the real backup code; the damage is done to its files.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pytest
import zstandard

from appliance.errors import IntegrityError, NotARepositoryError, RepositoryKeyError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource
from appliance.repo import Repository, objects
from appliance.repo.keys import KeySource
from appliance.repo.manifest import RestorePoint

CS = 64 * 1024
MARKER = b"bootback-secret-marker-7f3a"


def disk(data: bytes, name: str = "d") -> DiskSource:
    return DiskSource(name=name, size=len(data), format="raw", stream=io.BytesIO(data))


def payload(seed: int, chunks: int = 3) -> bytes:
    """Compressible chunks that each carry the marker: a leak would show it plainly or after zstd."""
    rnd = random.Random(seed)
    out = bytearray()
    for _ in range(chunks):
        chunk = bytearray(MARKER * (CS // len(MARKER)) + bytes(CS % len(MARKER)))
        chunk[:8] = rnd.randbytes(8)  # distinct chunks
        out += chunk
    return bytes(out)


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Repository, KeySource]:
    """An encrypted repository whose key is only in a key file (no scrypt per open: fast)."""
    key_file = tmp_path / "repo.key"
    repo = Repository.init(tmp_path / "repo", CS, "aes-256-gcm", key_file=key_file)
    return repo, KeySource((key_file,))


def point_file(repo: Repository, point: RestorePoint) -> Path:
    return repo.path / "points" / point.vm / f"{point.id}.point"


def chunk_file(repo: Repository, cid: str) -> Path:
    return repo.path / "chunks" / cid[:2] / cid


def read_disk(repo: Repository, point: RestorePoint) -> bytes:
    reader = repo.open_disk(repo.with_chunks(point), point.disks[0].name)
    return reader.read(0, reader.size)


def test_round_trip_and_nothing_in_the_clear(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    data = payload(1)
    point = backup_vm(repo, "vm01", [disk(data)], vmx_text=f'displayName = "{MARKER.decode()}"\n', source_info={})
    again = Repository.open(repo.path, keys)
    assert again.encrypted and again.config.encryption_name == "aes-256-gcm"
    assert read_disk(again, again.restore_point("vm01")) == data
    assert again.restore_point("vm01").vmx.count(MARKER.decode()) == 1
    dctx = zstandard.ZstdDecompressor()
    files = [p for p in repo.path.rglob("*") if p.is_file()]
    assert len([p for p in files if "chunks" in p.parts]) == 3
    for path in files:
        blob = path.read_bytes()
        assert MARKER not in blob, path
        for start in range(len(blob)):  # any zstd frame anywhere in the file
            if blob[start : start + 4] == b"\x28\xb5\x2f\xfd":
                try:
                    assert MARKER not in dctx.decompress(blob[start:], max_output_size=1 << 22), path
                except zstandard.ZstdError:
                    pass
    # chunk ids are keyed: not the SHA-256 of the content, and different in another repository
    first = point.disks[0].chunks[0]
    assert first != hashlib.sha256(data[:CS]).hexdigest()
    other = Repository.init(repo.path.parent / "other", CS, "aes-256-gcm", key_file=repo.path.parent / "o.key")
    assert other.store.chunk_id(data[:CS]) != first


def flips(blob: bytes) -> list[int]:
    """Every byte of a small object, at most 600 positions spread over a large one."""
    return list(range(len(blob))) if len(blob) <= 600 else sorted({*range(64), *range(0, len(blob), len(blob) // 500)})


def test_one_changed_byte_of_any_chunk_is_named(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    point = backup_vm(repo, "vm01", [disk(payload(2, 1))], source_info={})
    cid = point.disks[0].chunks[0]
    path = chunk_file(repo, cid)
    good = path.read_bytes()
    for i in flips(good):
        blob = bytearray(good)
        blob[i] ^= 0x01
        path.write_bytes(bytes(blob))
        with pytest.raises(IntegrityError, match=f"chunk {cid}"):
            Repository.open(repo.path, keys).store.get(cid)
    path.write_bytes(good)
    assert Repository.open(repo.path, keys).store.get(cid) == payload(2, 1)


def test_one_changed_byte_of_a_point_file_is_refused(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    point = backup_vm(repo, "vm01", [disk(payload(3))], vmx_text="a = 1\n", source_info={})
    path = point_file(repo, point)
    good = path.read_bytes()
    opened = Repository.open(repo.path, keys)  # reads the point file anew at each call
    for i in flips(good):
        blob = bytearray(good)
        blob[i] ^= 0x80
        path.write_bytes(bytes(blob))
        with pytest.raises(IntegrityError, match=f"restore point vm01@{point.id}"):
            opened.restore_point("vm01", point.id)


def test_swapped_objects_are_detected(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    a = backup_vm(repo, "vm01", [disk(payload(4))], source_info={})
    b = backup_vm(repo, "vm01", [disk(payload(5))], source_info={})
    # a chunk under another chunk's name
    ca, cb = a.disks[0].chunks[0], b.disks[0].chunks[0]
    chunk_file(repo, cb).write_bytes(chunk_file(repo, ca).read_bytes())
    with pytest.raises(IntegrityError, match=f"chunk {cb}.*authentication failed"):
        Repository.open(repo.path, keys).store.get(cb)
    # a whole point file under another point's name
    pa, pb = point_file(repo, a), point_file(repo, b)
    saved_b = pb.read_bytes()
    pb.write_bytes(pa.read_bytes())
    with pytest.raises(IntegrityError, match=f"vm01@{b.id} \\(summary\\).*authentication failed"):
        Repository.open(repo.path, keys).restore_point("vm01", b.id)
    # b's summary with a's chunk lists spliced in
    summary_len = objects.ENVELOPE_HEADER_SIZE + int.from_bytes(saved_b[8:16], "big")
    a_summary_len = objects.ENVELOPE_HEADER_SIZE + int.from_bytes(pa.read_bytes()[8:16], "big")
    pb.write_bytes(saved_b[:summary_len] + pa.read_bytes()[a_summary_len:])
    with pytest.raises(IntegrityError, match=f"vm01@{b.id} \\(chunk lists\\)"):
        Repository.open(repo.path, keys).restore_point("vm01", b.id)


def test_plain_objects_are_refused_in_an_encrypted_repository(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    point = backup_vm(repo, "vm01", [disk(payload(6, 1))], source_info={})
    cid = point.disks[0].chunks[0]
    data = payload(6, 1)
    chunk_file(repo, cid).write_bytes(
        objects.pack(objects.CHUNK_MAGIC, data, zstandard.ZstdCompressor().compress(data))
    )
    with pytest.raises(IntegrityError, match=f"chunk {cid}.*unencrypted object"):
        Repository.open(repo.path, keys).store.get(cid)


def test_wrong_or_missing_key_is_one_clear_error(tmp_path: Path, keyed: tuple[Repository, KeySource]) -> None:
    repo, _keys = keyed
    where = f"repository {repo.path}"
    with pytest.raises(RepositoryKeyError, match=f"^{where} is encrypted and its key is kept outside it"):
        Repository.open(repo.path, KeySource())
    other_key = tmp_path / "other.key"
    Repository.init(tmp_path / "other", CS, "aes-256-gcm", key_file=other_key)
    with pytest.raises(RepositoryKeyError, match="no key file given is for this repository"):
        Repository.open(repo.path, KeySource((other_key,)))
    # a key file naming this repository but holding another key
    doc = json.loads(other_key.read_text())
    forged = tmp_path / "forged.key"
    forged.write_text(json.dumps({**doc, "repository": repo.config.id}))
    forged.chmod(0o600)
    with pytest.raises(RepositoryKeyError, match=f"key file {forged} does not hold this repository's key"):
        Repository.open(repo.path, KeySource((forged,)))


def test_passphrase_wrapped_key(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", CS, "aes-256-gcm", KeySource(passphrase="correct horse"))
    config = json.loads((repo.path / "config.json").read_text())
    assert config["features"] == ["encryption"] and config["encryption"]["key"]["kdf"] == "scrypt"
    data = payload(7)
    backup_vm(repo, "vm01", [disk(data)], source_info={})
    reopened = Repository.open(repo.path, KeySource(passphrase="correct horse"))
    assert read_disk(reopened, reopened.restore_point("vm01")) == data
    with pytest.raises(RepositoryKeyError, match=f"^repository {repo.path}: wrong passphrase"):
        Repository.open(repo.path, KeySource(passphrase="wrong horse"))
    with pytest.raises(RepositoryKeyError, match="is encrypted: set BOOTBACK_PASSPHRASE"):
        Repository.open(repo.path, KeySource())
    # a hostile config cannot make opening take unbounded memory or time
    config["encryption"]["key"]["n"] = 1 << 30
    (repo.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepositoryKeyError, match="scrypt parameters n=1073741824 r=8 p=1 out of bounds"):
        Repository.open(repo.path, KeySource(passphrase="correct horse"))


def test_unencrypted_repositories_are_unchanged(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", CS)
    data = payload(8, 1)
    point = backup_vm(repo, "vm01", [disk(data)], source_info={})
    assert point.disks[0].chunks[0] == hashlib.sha256(data).hexdigest()
    config = json.loads((repo.path / "config.json").read_text())
    assert "encryption" not in config and config["features"] == [] and config["format"] == 2
    assert not Repository.open(repo.path).encrypted
    assert Repository.open(repo.path).config.encryption_name == "none"


def test_a_downgraded_config_is_refused(tmp_path: Path, keyed: tuple[Repository, KeySource]) -> None:
    """Someone who can write the repository replaces config.json by an unencrypted one: the key file given names
    the repository, so it is not opened; with only a passphrase it opens, but nothing plain is written."""
    repo, keys = keyed
    backup_vm(repo, "vm01", [disk(payload(9, 1))], source_info={})
    config = json.loads((repo.path / "config.json").read_text())
    for field in ("features", "hash", "encryption"):
        del config[field]
    (repo.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepositoryKeyError, match=f"config.json says unencrypted, but key file {keys.key_files[0]}"):
        Repository.open(repo.path, keys)
    before = sorted(p for p in repo.path.rglob("*") if p.is_file())
    downgraded = Repository.open(repo.path, KeySource(passphrase="the operator's"))
    with pytest.raises(RepositoryKeyError, match="is not encrypted .config.json., but BOOTBACK_PASSPHRASE was given"):
        backup_vm(downgraded, "vm01", [disk(payload(10, 1))], source_info={})
    assert sorted(p for p in repo.path.rglob("*") if p.is_file()) == before
    # a repository meant to be plain, with the operator's standing choice, is written as before
    plain = Repository.init(tmp_path / "plain", CS)
    opened = Repository.open(plain.path, KeySource(passphrase="the operator's", plain_ok=True))
    assert backup_vm(opened, "vm01", [disk(payload(11, 1))], source_info={}).vm == "vm01"


def test_key_files_open_to_other_users_are_refused(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    key_file = keys.key_files[0]
    assert key_file.stat().st_mode & 0o777 == 0o600
    for mode in (0o644, 0o604, 0o660):
        key_file.chmod(mode)
        with pytest.raises(RepositoryKeyError, match=f"key file {key_file} is open to other users .mode 0{mode:o}."):
            Repository.open(repo.path, keys)
    key_file.chmod(0o640)  # a group-readable secret mount
    assert Repository.open(repo.path, keys).encrypted


def test_key_commands_take_s3_repositories() -> None:
    """``key export|import s3://BUCKET/PREFIX FILE`` name the bucket, not a local directory "s3:/BUCKET/PREFIX"."""
    from appliance.cli import build_parser

    for action in ("export", "import"):
        args = build_parser().parse_args(["key", action, "s3://bucket/prefix", "repo.key"])
        assert args.repo == "s3://bucket/prefix"


def test_a_hostile_key_check_is_one_clear_error(keyed: tuple[Repository, KeySource]) -> None:
    repo, keys = keyed
    config = json.loads((repo.path / "config.json").read_text())
    config["encryption"]["key_check"] = "é" * 64  # hmac.compare_digest would raise TypeError on it
    (repo.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepositoryKeyError, match="encryption settings are damaged or unknown"):
        Repository.open(repo.path, keys)
    config["features"] = 1  # not a list: one line too
    (repo.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotARepositoryError, match=r"config.json is damaged \(features 1\)"):
        Repository.open(repo.path, keys)

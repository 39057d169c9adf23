"""Helpers of the S3 tests for repositories with pack objects: where the indexes say each chunk object sits, and
changing a pack's bytes in the bucket behind the code's back."""

from __future__ import annotations

from appliance.repo import Repository, packindex
from appliance.repo.packindex import RECORD, PackRecord


def split(location: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://BUCKET/PREFIX``."""
    bucket, _, root = location[len("s3://") :].partition("/")
    return bucket, root


def records(repo: Repository) -> dict[str, PackRecord]:
    """Every index record of ``repo`` by chunk id (hex), decoded as a reader decodes them."""
    found: dict[str, PackRecord] = {}
    for info in repo.backend.list("index/"):
        blob = repo.backend.get(info.key, info.key, packindex.MAX_INDEX_OBJECT)
        payload = packindex.decode_index(blob, repo.store.envelope, info.key, repo.store.max_object)
        for i in range(0, len(payload), RECORD.size):
            rec = PackRecord(*RECORD.unpack_from(payload, i))
            found.setdefault(rec.chunk.hex(), rec)
    return found


def flip_byte(rgw, location: str, rec: PackRecord, at: int) -> None:  # noqa: ANN001
    """Flip byte ``at`` of the chunk object ``rec`` names, inside its pack in the bucket."""
    bucket, root = split(location)
    key = f"{root}/{rec.pack_key}"
    client = rgw.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[rec.offset + at] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

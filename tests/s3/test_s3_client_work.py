"""The S3 client's per-request work is trimmed (botocore's Python is what limits an S3 backup or restore on a small
machine, docs/benchmarks.md), without changing what is sent or read: timestamps parsed by the standard library
read as botocore's own parser reads them, and a chunk's PUT is one request carrying its bytes, with no
``Expect: 100-continue`` round trip before the body."""

from __future__ import annotations

import os

import pytest
from botocore.utils import parse_timestamp

from appliance.repo.backends.s3 import S3Store, fast_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 30 Nov 2026 08:00:00 GMT",  # Last-Modified, Date
        "Tue, 01 Dec 2026 23:59:59 +0100",
        "Mon, 30 Nov 2026 08:00:00 -0000",  # "no zone information": parsedate_to_datetime makes it naive
        "2026-11-30T08:13:46.334Z",  # a listing's LastModified
        "2026-11-30T08:13:46Z",
        "2026-11-30T08:13:46.334+02:00",
        "1764490000",  # epoch seconds
    ],
)
def test_fast_timestamps_read_as_botocore_reads_them(value: str) -> None:
    got = fast_timestamp(value)
    assert got.tzinfo is not None, got
    assert got.timestamp() == parse_timestamp(value).timestamp()


def test_a_chunk_put_is_one_request_with_its_bytes_and_no_expect(rgw, s3_repo: str) -> None:  # noqa: ANN001
    store = S3Store(s3_repo)
    sent: list[dict] = []
    http = store.client._endpoint.http_session  # what every request goes through, boto3's calls or the lean path's
    send = http.send
    http.send = lambda request: sent.append(dict(request.headers.items())) or send(request)
    puts = rgw.counters()["put"]
    blob = os.urandom(1 << 20)
    store.put("chunks/ab/abcd", blob)
    assert rgw.counters()["put"] - puts == 1
    assert len(sent) == 1 and "Expect" not in sent[0], sent
    assert int(sent[0]["Content-Length"]) == len(blob)
    sent.clear()
    assert store.get("chunks/ab/abcd", "chunk abcd", len(blob)) == blob
    assert len(sent) == 1, sent
    (info,) = list(store.list("chunks/"))
    _, server_now = store.list_with_time("chunks/")
    assert abs(server_now - info.mtime) < 60, (server_now, info.mtime)  # LastModified read in the server's zone

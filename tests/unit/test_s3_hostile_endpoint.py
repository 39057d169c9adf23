"""The S3 store against an endpoint that answers wrongly (hostile, buggy or cut off), and its leases against a
flaky network. A small in-memory S3 stands in for the endpoint: these are the answers a real gateway never
gives, so tests/s3 (a real Ceph RGW) cannot produce them.
"""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError
from botocore.response import StreamingBody

from appliance.errors import IntegrityError, RepositoryLockedError, StorageUnavailableError
from appliance.repo.backends import leases
from appliance.repo.backends.s3 import S3Store


class FakeS3:
    """Just enough of boto3's S3 client: objects in a dict, ListObjectsV2 pages of ``page`` keys."""

    def __init__(self, page: int = 1000) -> None:
        self.objects: dict[str, bytes] = {}
        self.mtime: dict[str, datetime] = {}
        self.page = page
        self.list_calls = 0
        self.deleted: list[str] = []
        self.fail_puts = False
        self.send_date = True
        self.meta = type("Meta", (), {"endpoint_url": "http://127.0.0.1:9"})()

    def _headers(self) -> dict:
        headers = {"date": format_datetime(datetime.now(UTC), usegmt=True)} if self.send_date else {}
        return {"ResponseMetadata": {"HTTPHeaders": headers}}

    def put_object(self, Bucket: str, Key: str, Body: bytes, IfNoneMatch: str | None = None) -> dict:  # noqa: N803
        if self.fail_puts:
            raise ClientError({"Error": {"Code": "ServiceUnavailable"}}, "PutObject")
        if IfNoneMatch == "*" and Key in self.objects:
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "PutObject")
        self.objects[Key], self.mtime[Key] = bytes(Body), datetime.now(UTC)
        return {}

    def delete_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803
        self.objects.pop(Key, None)
        self.deleted.append(Key)
        return {}

    def list_objects_v2(self, Bucket: str, Prefix: str, ContinuationToken: str = "", MaxKeys: int = 1000) -> dict:  # noqa: N803
        self.list_calls += 1
        if self.list_calls > 10_000:
            raise AssertionError("the store kept listing: an endless listing was followed")
        keys = sorted(k for k in self.objects if k.startswith(Prefix) and k > ContinuationToken)
        page = keys[: min(self.page, MaxKeys)]
        contents = [{"Key": k, "Size": len(self.objects[k]), "LastModified": self.mtime[k]} for k in page]
        more = len(keys) > len(page)
        resp = {"Contents": contents, "KeyCount": len(page), "IsTruncated": more, **self._headers()}
        if more:
            resp["NextContinuationToken"] = page[-1]
        return resp

    def get_object(self, Bucket: str, Key: str, Range: str | None = None) -> dict:  # noqa: N803
        data = self.objects[Key]
        return {"Body": StreamingBody(io.BytesIO(data), None), **self._headers()}  # a chunked answer: no length


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for name, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    s = S3Store("s3://bucket/repo")
    s.client = FakeS3()
    s.lean = None  # chunk requests go through the (fake) client too, not the lean path to the real endpoint
    return s


def test_listing_follows_every_page_in_order(store: S3Store) -> None:
    for i in range(2500):
        store.client.objects[f"repo/chunks/{i:05d}"] = b"x"
        store.client.mtime[f"repo/chunks/{i:05d}"] = datetime.now(UTC)
    keys = [info.key for info in store.list("chunks/")]
    assert keys == [f"chunks/{i:05d}" for i in range(2500)]
    assert store.client.list_calls == 3


def test_endless_or_backward_listing_is_one_error(store: S3Store) -> None:
    store.client.objects["repo/chunks/a"] = b"x"
    store.client.mtime["repo/chunks/a"] = datetime.now(UTC)
    real = store.client.list_objects_v2

    def same_page_forever(**kw: str) -> dict:
        return {**real(**kw), "IsTruncated": True, "NextContinuationToken": "again"}

    store.client.list_objects_v2 = same_page_forever
    with pytest.raises(StorageUnavailableError, match=r"listing chunks/: .*answered wrongly: key 'repo/chunks/a'"):
        list(store.list("chunks/"))

    def outside_prefix(**kw: str) -> dict:
        page = real(**kw)
        page["Contents"][0]["Key"] = "elsewhere/chunks/a"
        return page

    store.client.list_objects_v2 = outside_prefix
    with pytest.raises(StorageUnavailableError, match="out of order or outside"):
        list(store.list("chunks/"))


def test_oversized_object_without_content_length_is_refused_unread(store: S3Store) -> None:
    store.client.objects["repo/chunks/ab/big"] = b"z" * 10_000
    with pytest.raises(IntegrityError, match=r"chunk ab: s3://bucket/repo/chunks/ab/big holds more than bytes"):
        store.get("chunks/ab/big", "chunk ab", 100)
    store.client.objects["repo/config.json"] = b"{}"
    assert store.get("config.json", "config", 100) == b"{}"


def test_range_answer_longer_than_asked_is_refused(store: S3Store) -> None:
    store.client.objects["repo/points/vm/p.point"] = b"0123456789"

    def whole_object(Bucket: str, Key: str, Range: str) -> dict:  # noqa: N803 - ignores the Range it was asked
        data = store.client.objects[Key]
        return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentRange": f"bytes 2-3/{len(data)}"}

    store.client.get_object = whole_object
    with pytest.raises(IntegrityError, match=r"vm@p: .*asked for bytes 2-3, the endpoint answered more than 2 bytes"):
        store.read_range("points/vm/p.point", 2, 3, "vm@p")


def test_listing_without_server_date_never_uses_our_clock(store: S3Store) -> None:
    store.client.send_date = False
    with pytest.raises(StorageUnavailableError, match="no usable Date header"):
        store.list_with_time("locks/")


def test_endpoint_password_never_in_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:s3cr3t-pw@127.0.0.1:9/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s = S3Store("s3://bucket/repo")
    with pytest.raises(StorageUnavailableError) as err:
        s.is_empty()
    assert "did not answer" in str(err.value) and "s3cr3t" not in str(err.value), err.value
    assert "***@127.0.0.1:9" in str(err.value)


def test_lease_renewed_after_a_gap_is_not_trusted(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup cut off longer than half its lease may have been seen expired by a collector, which then deleted
    chunks the backup had deduplicated against: a later successful renewal must not let it commit."""
    monkeypatch.setenv("BOOTBACK_S3_LEASE_SECONDS", "4")  # a heartbeat every second
    with store.writer() as batch:
        batch.check_alive()
        store.client.fail_puts = True
        time.sleep(3)  # more than half the lease without a renewal
        store.client.fail_puts = False
        time.sleep(1.5)  # the heartbeat renews it again
        assert time.monotonic() - batch.lease._renewed < 2  # renewed: only the gap shows the lapse
        with pytest.raises(RepositoryLockedError, match="this backup lost its lease .*nothing was committed"):
            batch.check_alive()


def test_collector_past_its_lease_deletes_nothing(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection paused (or cut off) past its lease, while a backup started and deduplicated against an old
    unreferenced chunk, must not delete that chunk when it resumes."""
    store.client.objects["repo/chunks/ab/abc"] = b"x"
    store.client.mtime["repo/chunks/ab/abc"] = datetime.now(UTC)
    with store.exclusive(wait=False):
        an_hour_later = SimpleNamespace(monotonic=lambda: time.monotonic() + 3600)
        monkeypatch.setattr(leases, "time", an_hour_later)  # the process was stopped for an hour
        with pytest.raises(RepositoryLockedError, match="garbage collection lost its lease"):
            store.delete("chunks/ab/abc")
        monkeypatch.undo()
    assert "repo/chunks/ab/abc" in store.client.objects
    assert store.client.deleted == ["repo/locks/gc.120s"]  # only its own lease, on release


def test_collector_whose_create_was_retried_keeps_its_lease(store: S3Store) -> None:
    """The conditional PUT of the GC lease succeeded but its answer was lost: the client's retry finds the object
    (PreconditionFailed). The collector must know the lease is its own, not report itself as running elsewhere
    and leave a lease behind that holds backups off."""
    real = store.client.put_object

    def answer_lost_then_retried(**kw: object) -> dict:
        real(**kw)
        if kw.get("IfNoneMatch") == "*":
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "PutObject")  # what the retry saw
        return {}

    store.client.put_object = answer_lost_then_retried
    with store.exclusive(wait=False):
        assert store.collectable_before() > 0
    assert not any(k.startswith("repo/locks/") for k in store.client.objects)

"""A restore point becomes visible only while its writer's lease surely holds: the lease is checked right before
the create-only point write, and that write's retries and timeouts end within half a lease (the general client
may retry a request for ~95 s against the default 120 s lease's 60 s margin). A slow store is a real HTTP server
on loopback that takes the PUT and never answers in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from appliance.errors import IntegrityError, RepositoryLockedError, StorageUnavailableError
from appliance.repo.backends.s3 import S3Store, make_client, point_attempts, point_timeout, point_write_seconds
from tests.unit.test_s3_hostile_endpoint import store  # noqa: F401 - the in-memory store fixture

POINT = "points/web/20260101T000000Z.point"


@pytest.mark.parametrize("ttl", [3, 4, 8, 10, 60, 120, 600, 3600])
def test_point_write_ends_within_half_a_lease(ttl: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    config = make_client(point_ttl=ttl).meta.config
    assert config.connect_timeout == config.read_timeout == point_timeout(ttl)
    assert config.retries["total_max_attempts"] == point_attempts(ttl)
    assert point_write_seconds(ttl) <= ttl / 2
    assert point_write_seconds(120) == 30.0


def test_lease_checked_right_before_the_point_write(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The heartbeat stalls (the store slow to take the renewals) past half the lease; the point's own PUT
    would go through, but the backup fails with one clear line and nothing is visible."""
    monkeypatch.setenv("BOOTBACK_S3_LEASE_SECONDS", "4")
    store._point_client = store.client
    with store.writer() as batch:
        store.client.fail_puts = True
        time.sleep(2.3)  # more than half the lease without a renewal
        store.client.fail_puts = False
        with pytest.raises(RepositoryLockedError, match="this backup lost its lease .*nothing was committed"):
            batch.write_point(POINT, b"point")
    assert f"repo/{POINT}" not in store.client.objects


def test_point_write_is_create_only_and_knows_its_own_retry(store: S3Store) -> None:  # noqa: F811
    store._point_client = store.client
    with store.writer() as batch:
        batch.write_point(POINT, b"point")
        batch.write_point(POINT, b"point")  # our PUT retried after its answer was lost: the same bytes
        with pytest.raises(IntegrityError, match=f"restore point {POINT} exists already"):
            batch.write_point(POINT, b"another")
    assert store.client.objects[f"repo/{POINT}"] == b"point"


@pytest.fixture
def slow_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    """An endpoint that reads each PUT's body and then does not answer for a minute."""
    release = threading.Event()
    puts: list[str] = []

    class Slow(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            puts.append(self.path)
            release.wait(60)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield "s3://bucket/repo", puts
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("ttl", [8, 20])
def test_slow_point_upload_gives_up_within_its_budget(slow_store: tuple[str, list[str]], ttl: int) -> None:
    location, puts = slow_store
    slow = S3Store(location)
    slow._point_client = make_client(point_ttl=ttl)  # what writer() makes when the backup starts
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="the restore point was not committed .*run the backup again"):
        slow.put_point(POINT, b"point" * 1000, ttl)
    elapsed = time.monotonic() - started
    assert elapsed <= point_write_seconds(ttl) + 1.0, (elapsed, point_write_seconds(ttl))  # 1 s: a loaded machine
    assert len(puts) == point_attempts(ttl), puts

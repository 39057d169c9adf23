"""A chunk's GET, PUT and HEAD go through the lean path (``backends/s3lean.py``: botocore's signer and the
client's HTTP session, no boto3 call), and every error reads as it did through boto3: a missing object, refused
credentials, no credentials, a missing bucket, an endpoint that refuses connections (retried as often as boto3
retries), a cut-off answer, and a gateway that answers 503 twice before the object (retried, then read)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import urllib3

from appliance.errors import IntegrityError, StorageUnavailableError
from appliance.repo.backends.s3 import S3Store
from appliance.repo.backends.s3lean import ADDRESS_MARKER
from appliance.repo.store import ChunkStore

MiB = 1 << 20


def boto3_calls(store: S3Store) -> list[str]:
    """Every boto3 operation the store's client makes from now on (the lean path makes none)."""
    calls: list[str] = []

    def seen(model, params: dict, **_: object) -> None:  # noqa: ANN001
        if ADDRESS_MARKER not in params.get("url_path", ""):  # the lean path's one look at boto3's addressing
            calls.append(model.name)

    store.client.meta.events.register("before-call.s3", seen)
    return calls


def sends(store: S3Store) -> list[str]:
    """Every HTTP request that leaves the client's session (boto3's or the lean path's), as 'METHOD url'."""
    sent: list[str] = []
    http_session = store.client._endpoint.http_session
    send = http_session.send
    http_session.send = lambda request: sent.append(f"{request.method} {request.url}") or send(request)
    return sent


def test_chunk_get_put_and_head_are_lean_requests_counted_at_the_gateway(rgw, s3_repo: str) -> None:  # noqa: ANN001
    store = S3Store(s3_repo)
    chunks = ChunkStore(store, MiB)
    calls = boto3_calls(store)
    data = os.urandom(MiB)
    cid = hashlib.sha256(data).hexdigest()
    with store.writer() as batch:  # the writer's lease and chunk listing are boto3 calls: not counted below
        assert not batch.has(chunks.key(cid))
        calls.clear()
        before = rgw.counters()
        stored = chunks.stage(cid, data, batch)
        assert chunks.exists(cid) and not chunks.exists("0" * 64)
        assert chunks.get(cid) == data
        after = rgw.counters()
        assert calls == [], calls
    got = {k: after[k] - before[k] for k in ("req", "put", "put_b", "get", "get_b", "failed_req")}
    # the gateway counts a HEAD as a GET of no bytes, the HEAD of a missing object as a failed request, and a
    # GET's bytes as its last byte's offset (Ceph 16: one less than it sent)
    assert got == {"req": 4, "put": 1, "put_b": stored, "get": 2, "get_b": stored - 1, "failed_req": 1}, got


def test_a_missing_or_corrupted_chunk_is_an_integrity_error_naming_it(s3_repo: str) -> None:
    store = S3Store(s3_repo)
    chunks = ChunkStore(store, MiB)
    calls = boto3_calls(store)
    cid = "ab" * 32
    with pytest.raises(IntegrityError, match=f"chunk {cid} is missing"):
        chunks.get(cid)
    store.put(chunks.key(cid), b"BBCK\x01\x01\x00\x00\x00\x00\x00\x05not zstd")
    with pytest.raises(IntegrityError, match=f"chunk {cid}.*not a zstd frame"):
        chunks.get(cid)
    with pytest.raises(IntegrityError, match=f"chunk {cid}.*holds 20 bytes, more than the 19"):
        store.get(chunks.key(cid), f"chunk {cid}", 19)
    assert calls == [], calls


def lean_operations(store: S3Store) -> dict[str, Callable[[], object]]:
    return {
        "GET": lambda: store.get("chunks/ab/cd", "chunk cd", MiB),
        "PUT": lambda: store.put("chunks/ab/cd", b"x"),
        "HEAD": lambda: store.exists("chunks/ab/cd"),
    }


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, r"access denied by http://127\.0\.0\.1:\d+ \(.*check the cred"),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, r"access denied by .*\((InvalidAccessKeyId|403)\): check the credentials"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no S3 credentials: set AWS_ACCESS_KEY_ID"),
        ({"bucket": "no-such-bucket-here"}, "bucket 'no-such-bucket-here' does not exist at http://127"),
    ],
)
def test_refusals_give_the_same_one_line_as_boto3(
    rgw,
    s3_repo: str,
    monkeypatch: pytest.MonkeyPatch,
    change: dict,
    expect: str,  # noqa: ANN001
) -> None:
    location = s3_repo
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials: never ask an instance's metadata
    for name, value in change.items():
        if name == "bucket":
            location = f"s3://{value}/repo"
        elif value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    store = S3Store(location)
    calls = boto3_calls(store)
    lean = outcomes(store)
    assert calls == [], calls
    store.lean = None  # the same requests through boto3
    assert outcomes(store) == lean
    for op, outcome in lean.items():
        if op == "HEAD" and "bucket" in change:  # a HEAD's 404 has no body to tell a bucket from a key
            assert outcome is False
            continue
        assert re.search(expect, str(outcome)) and "\n" not in str(outcome), (op, outcome)
        assert "not-the-secret" not in str(outcome) and "bootback-test-secret" not in str(outcome)


def outcomes(store: S3Store) -> dict[str, object]:
    """What each lean operation returns, or the message of the StorageUnavailableError it raises."""
    got: dict[str, object] = {}
    for op, run in lean_operations(store).items():
        try:
            got[op] = run()
        except StorageUnavailableError as exc:
            got[op] = str(exc)
    return got


def test_a_refused_connection_is_retried_as_boto3_retries_it(s3_repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = S3Store(s3_repo)
    calls = boto3_calls(store)
    sent = sends(store)
    with pytest.raises(StorageUnavailableError, match=r"reading chunk cd: the S3 endpoint .* did not answer"):
        store.get("chunks/ab/cd", "chunk cd", MiB)
    assert calls == [] and len(sent) == store.client.meta.config.retries["total_max_attempts"], (calls, sent)
    lean_sent = list(sent)
    sent.clear()
    store.lean = None
    with pytest.raises(StorageUnavailableError, match=r"reading chunk cd: the S3 endpoint .* did not answer"):
        store.get("chunks/ab/cd", "chunk cd", MiB)
    assert sent == lean_sent


class Scripted(http.server.BaseHTTPRequestHandler):
    """An endpoint answering each GET with the next of ``answers``: (status, headers, body)."""

    answers: list[tuple[int, dict[str, str], bytes]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, headers, body = self.answers.pop(0)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Scripted]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    yield Scripted
    server.shutdown()
    server.server_close()


def test_busy_answers_are_retried_and_a_cut_off_answer_is_an_error(scripted: type[Scripted]) -> None:
    slow = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
    scripted.answers = [(503, {"Content-Length": str(len(slow))}, slow)] * 2 + [
        (200, {"Content-Length": "5"}, b"hello")
    ]
    store = S3Store("s3://bucket/repo")
    calls = boto3_calls(store)
    sent = sends(store)
    assert store.get("chunks/ab/cd", "chunk cd", MiB) == b"hello"
    assert calls == [] and len(sent) == 3 and not scripted.answers, sent
    scripted.answers = [(200, {"Content-Length": "10"}, b"hello")]  # five bytes of the ten announced
    with pytest.raises(StorageUnavailableError, match="reading chunk cd: the S3 endpoint .* did not answer"):
        store.get("chunks/ab/cd", "chunk cd", MiB)
    scripted.answers = [(200, {"Transfer-Encoding": "chunked"}, b"6\r\nhello!\r\n0\r\n\r\n")]  # no length
    with pytest.raises(
        IntegrityError,
        match="chunk cd: s3://bucket/repo/chunks/ab/cd holds more than bytes, more than the 5 it may hold",
    ):
        store.get("chunks/ab/cd", "chunk cd", 5)


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:9"])
def test_lean_urls_are_the_ones_boto3_sends_to(endpoint: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Virtual-host style on AWS, path style on an endpoint of one's own, keys escaped as botocore escapes them.
    Nothing is sent: a before-send handler answers boto3's request in place of the network."""
    from botocore.awsrequest import AWSResponse

    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = S3Store("s3://my-bucket/a prefix+x/é~")
    sent: list[str] = []

    def answer(request, **_: object) -> AWSResponse:  # noqa: ANN001
        sent.append(request.url)
        return AWSResponse(request.url, 200, {}, urllib3.HTTPResponse(io.BytesIO(b""), preload_content=False))

    key = store._key("chunks/ab/cd")
    lean = store.lean._url(key)
    store.client.meta.events.register("before-send.s3.HeadObject", answer)
    store.client.head_object(Bucket=store.bucket, Key=key)
    assert [lean] == sent
    assert sent[0].startswith(
        "https://my-bucket.s3.eu-west-1.amazonaws.com/" if not endpoint else endpoint + "/my-bucket/"
    )

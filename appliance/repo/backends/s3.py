"""A repository on S3 object storage (Ceph RGW, MinIO, AWS): ``s3://BUCKET/PREFIX``, through boto3.

Endpoint and credentials come the standard way of S3 tools, read by boto3 itself: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and ``~/.aws``. They are
never put in a message or a log line; errors name the location, the endpoint and the S3 error code only.

Durability: a PUT is atomic and durable when it returns, so there is no staging: a backup's chunks are PUT as
they are made, and its point is PUT last, after every chunk PUT returned (a point that is visible is complete;
a failed backup leaves only unreferenced chunks). Concurrency without ``flock`` is kept by lease objects
(``leases``) and a grace period before garbage collection deletes young chunks; ``docs/repository-format.md``
tells the whole rule.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import BinaryIO

from appliance.errors import ConfigError, IntegrityError, RepositoryLockedError, StorageUnavailableError, UsageError
from appliance.repo.backends import S3_SCHEME, ChunkBatch, ObjectInfo, ObjectStore
from appliance.repo.backends.chunkids import ChunkIds
from appliance.repo.backends.leases import GC_LEASE, Lease, expired_leases, gc_grace_seconds, live_leases
from appliance.repo.backends.s3lean import LeanS3, Redirected

BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PREFIX = 512
FIRST_READ = 256 << 10  # a point file's first GET: its summary, and the chunk lists of disks up to ~4 TB
POOL_CONNECTIONS = 32  # backup workers and read-ahead threads share one client
MAX_EMPTY_PAGES = 100  # truncated listing pages without a key, in a row: an endpoint that pages forever


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://BUCKET[/PREFIX]``; UsageError naming the value when it is malformed."""
    bucket, _, prefix = location[len(S3_SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    if not BUCKET_RE.fullmatch(bucket):
        raise UsageError(
            f"repository {location!r}: {bucket!r} is not a bucket name (3 to 63 lowercase letters, digits, '.', '-')"
        )
    parts = prefix.split("/") if prefix else []
    if len(prefix) > MAX_PREFIX or any(p in ("", ".", "..") for p in parts) or re.search(r"[\x00-\x1f\x7f\\]", prefix):
        raise UsageError(f"repository {location!r}: the prefix must be '/'-separated names without '.', '..' or //")
    return bucket, prefix


def redact_endpoint(url: str) -> str:
    """``url`` without a user or password in it (``http://user:secret@host`` names ``http://***@host``)."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rpartition("@")[2]
    return f"{scheme}{sep}{host}{slash}{path}"


RETRY_BACKOFF_MAX = 1.0  # botocore's standard mode waits at most random() * 2**0 s before the first retry


def point_attempts(ttl: int) -> int:
    """Tries of a restore point's PUT under a lease of ``ttl`` seconds: one retry where the lease leaves room."""
    return 2 if ttl / 4 > 2 * RETRY_BACKOFF_MAX else 1


def point_timeout(ttl: int) -> float:
    """Connect and read timeout of one try of a restore point's PUT: chosen so that ``point_write_seconds``
    is a quarter of the lease (30 s of the default 120)."""
    attempts = point_attempts(ttl)
    backoff = RETRY_BACKOFF_MAX if attempts > 1 else 0.0
    return max(0.1, (ttl / 4 - backoff) / (2 * attempts))


def point_write_seconds(ttl: int) -> float:
    """The longest a restore point's write can take, retries included (each try's connect and read timeouts,
    the wait before the retry): at most half a lease, which is what the lease check guarantees is left, so a
    point is visible before its writer's lease could have lapsed."""
    attempts = point_attempts(ttl)
    return attempts * 2 * point_timeout(ttl) + (RETRY_BACKOFF_MAX if attempts > 1 else 0.0)


_loader_lock = threading.Lock()
_loader = None  # botocore's loaded service models, shared by every client of the process (the point writer's too)


def _new_session():  # noqa: ANN202 - a boto3 Session, typed at runtime only
    """A boto3 session resolving credentials and region afresh (the environment may have changed), sharing the
    process's loaded models (~0.3 s of CPU per client otherwise), whose parsers read timestamps with
    ``fast_timestamp``."""
    global _loader
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
    return boto3.session.Session(botocore_session=core)


def fast_timestamp(value: str) -> datetime:
    """A response's timestamp (``Last-Modified: Mon, 30 Nov 2026 08:00:00 GMT``, a listing's ISO 8601 time) as
    an aware datetime with the standard library's parsers: botocore's default (dateutil) costs ~0.2 ms of
    Python per GET, a tenth of the request. Anything else goes to botocore's own parser."""
    from botocore.utils import parse_timestamp

    try:
        parsed = parsedate_to_datetime(value) if value[:1].isalpha() else datetime.fromisoformat(value)
    except (TypeError, ValueError, IndexError):
        parsed = None
    return parsed if parsed is not None and parsed.tzinfo is not None else parse_timestamp(value)


def _trim_handlers(client) -> None:  # noqa: ANN001 - a botocore client
    """Remove per-request work that does nothing for this store's requests (each handler runs on every request;
    at ~3 ms of client CPU per 1 MiB object, botocore's Python is what limits throughput here):

    - the PutObject body stays ``bytes`` instead of becoming a file object: http.client then sends it in one
      call, not in 16 KiB reads, and botocore adds no ``Expect: 100-continue`` (a wait for the gateway's
      interim answer before every PUT's body); retries resend the same immutable bytes;
    - SSE-C key digests (no customer keys are passed), idempotency tokens (S3 has none), and Lambda's
      recursion-detection header."""
    from botocore import handlers

    events = client.meta.events
    events.unregister("before-parameter-build.s3.PutObject", handlers.convert_body_to_file_like_object)
    for operation in ("GetObject", "HeadObject", "PutObject"):
        events.unregister(f"before-parameter-build.s3.{operation}", handlers.sse_md5)
    events.unregister("before-parameter-build", handlers.generate_idempotent_uuid)
    events.unregister("before-call", handlers.add_recursion_detection_header)


def make_client(point_ttl: int | None = None, session=None):  # noqa: ANN001, ANN201 - boto3 objects
    """An S3 client configured from the environment and ~/.aws (boto3's own resolution). ``point_ttl``: the
    client that writes restore points under a lease of that many seconds, with its retries and timeouts bounded
    to ``point_write_seconds`` (the general client may retry a request for ~95 s)."""
    from botocore.config import Config

    session = session or _new_session()
    custom_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    timeout = point_timeout(point_ttl) if point_ttl else None
    config = Config(
        region_name=session.region_name or "us-east-1",
        s3={"addressing_style": "path" if custom_endpoint else "auto"},  # RGW/MinIO on an address: path style
        # botocore's max_attempts counts retries, total_max_attempts the first try too
        retries={"mode": "standard", "total_max_attempts": point_attempts(point_ttl)}
        if point_ttl
        else {"mode": "standard", "max_attempts": 3},
        connect_timeout=timeout or 5,
        read_timeout=timeout or 30,
        max_pool_connections=POOL_CONNECTIONS,
        tcp_keepalive=True,
        # botocore >= 1.36 adds CRC32 checksum trailers to requests and checks response checksums by default:
        # not understood by every S3-compatible service, and a second checksum of every byte for nothing here,
        # since every object read is checked by its own SHA-256 (chunks: their id; points: their sealed hash)
        # or AEAD tag, and the PUT's payload is signed (SigV4 hashes it on plain http).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = session.client("s3", config=config)
    _trim_handlers(client)
    return client


class S3Store(ObjectStore):
    read_ahead = 16  # ~5 ms per GET here, ~50 ms on a WAN: keep enough in flight to stream
    remote = True

    def __init__(self, location: str) -> None:
        self.bucket, self.prefix = parse_location(location)
        self.location = f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{self.bucket}"
        self.name = self.prefix.rsplit("/", 1)[-1] if self.prefix else self.bucket
        from botocore.exceptions import BotoCoreError

        try:
            session = _new_session()
            self.client = make_client(session=session)
            # chunk GETs, PUTs and HEADs: botocore's signer and the client's session, without its per-call work
            self.lean: LeanS3 | None = LeanS3(self.client, self.bucket, session.get_credentials())
        except (BotoCoreError, ValueError) as exc:  # an unknown AWS_PROFILE, a malformed AWS_ENDPOINT_URL ...
            raise ConfigError(f"{self.location}: the S3 settings are not usable: {exc}") from None
        self.endpoint = redact_endpoint(self.client.meta.endpoint_url)  # named in messages: never a password
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._gc_now: float | None = None  # the server's time when garbage collection took its lease
        self._gc_lease: Lease | None = None  # checked before every delete while garbage collection runs
        self._point_client = None  # restore points' writes: bounded retries and timeouts (put_point)

    # --- errors ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Translate boto3's errors: a missing object is FileNotFoundError, everything else that stops a request
        (endpoint down, credentials refused, no bucket, a broken connection) one StorageUnavailableError line."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from urllib3.exceptions import HTTPError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(what) from None
            raise StorageUnavailableError(self._refusal(code, status, what)) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageUnavailableError(
                f"{self.location}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE naming a profile in ~/.aws"
            ) from None
        except (BotoCoreError, HTTPError) as exc:
            raise StorageUnavailableError(
                f"{self.location}: {what}: the S3 endpoint {self.endpoint} did not answer ({type(exc).__name__})"
            ) from None

    def _refusal(self, code: str, status: int | None, what: str) -> str:
        if code == "NoSuchBucket":
            return f"{self.location}: bucket {self.bucket!r} does not exist at {self.endpoint}"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
            return (
                f"{self.location}: access denied by {self.endpoint} ({code or status}): check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the ~/.aws profile)"
            )
        return f"{self.location}: {what}: {self.endpoint} answered {code or status}"

    def _key(self, key: str) -> str:
        return self._root + key

    # --- objects -----------------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        with self.errors("listing the bucket"):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1)
        return not resp.get("KeyCount")

    def create(self) -> None:
        self.is_empty()  # the bucket answers, with these credentials; S3 needs no folders

    def get(self, key: str, name: str, limit: int) -> bytes:
        with self.errors(f"reading {name}"):
            if self.lean is not None:
                try:
                    return self._get_lean(key, name, limit)
                except Redirected:
                    self.lean = None  # a region redirect: boto3 follows it, from now on for every request
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = resp["Body"]
            announced = resp.get("ContentLength")  # absent with a chunked answer: the read below is bounded anyway
            if announced is None:
                data = _read_at_most(body, limit + 1)
            else:  # one read of what was announced, no copies; botocore checks it got all of it
                data = body.read() if announced <= limit else b""
            if len(data) > limit or announced is not None and announced > limit:
                body.close()
                raise self._too_big(key, name, announced, limit)
            return data

    def _too_big(self, key: str, name: str, announced: int | None, limit: int) -> IntegrityError:
        return IntegrityError(
            f"{name}: {self.location}/{key} holds {announced if announced is not None else 'more than'} "
            f"bytes, more than the {limit} it may hold"
        )

    def _get_lean(self, key: str, name: str, limit: int) -> bytes:
        """``get`` through the lean path: the same bounds and checks as botocore's streaming body."""
        from botocore.exceptions import IncompleteReadError

        raw = self.lean.get(self._key(key)).raw
        length = raw.headers.get("content-length")
        announced = int(length) if length is not None and length.isdigit() else None
        if announced is not None and announced > limit:
            raw.close()
            raise self._too_big(key, name, announced, limit)
        data = raw.read() if announced is not None else _read_at_most(raw, limit + 1)  # one read, no copies
        if len(data) > limit:  # a chunked answer, bounded
            raw.close()
            raise self._too_big(key, name, None, limit)
        if announced is not None and len(data) != announced:  # cut off (http.client raises first; kept as a bound)
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=announced)
        raw.release_conn()
        return data

    def read_range(self, key: str, start: int, end: int, name: str) -> tuple[bytes, int]:
        """Bytes ``start..end`` (inclusive, clipped to the object) and the object's whole size."""
        with self.errors(f"reading {name}"):
            try:
                content_range, length, data = self._get_range(key, start, end)
            except Exception as exc:
                response = getattr(exc, "response", {})
                if response.get("Error", {}).get("Code") == "InvalidRange":  # the range starts past the end
                    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                    size = headers.get("content-range", "").rpartition("/")[2]  # "bytes */SIZE", if it says
                    if size.isdigit() or start == 0:
                        return b"", int(size) if size.isdigit() else 0  # start 0: the object is empty
                    head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))  # an error's path only
                    return b"", int(head.get("ContentLength", -1))
                raise
        total = content_range.rpartition("/")[2] if "/" in content_range else length
        size = int(total) if str(total).isdigit() else -1
        expected = max(0, min(end + 1, size) - start)
        if size < 0 or len(data) != expected:
            got = f"more than {expected}" if len(data) > expected else str(len(data))
            raise IntegrityError(
                f"{name}: {self.location}/{key}: asked for bytes {start}-{end}, the endpoint answered {got} bytes "
                f"of an object of {total!r} bytes"
            )
        return data, size

    def _get_range(self, key: str, start: int, end: int) -> tuple[str, str | int | None, bytes]:
        """(Content-Range, Content-Length, body) of a ranged GET; the body read to one byte more than asked
        (a longer answer shows). Through the lean path when it works (a pack read is a restore's hot request)."""
        byte_range, most = f"bytes={start}-{end}", end - start + 2
        if self.lean is not None:
            try:
                raw = self.lean.get(self._key(key), byte_range).raw
            except Redirected:
                self.lean = None
            else:
                data = _read_at_most(raw, most)
                raw.release_conn() if len(data) < most else raw.close()
                return raw.headers.get("content-range") or "", raw.headers.get("content-length"), data
        resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=byte_range)
        return resp.get("ContentRange") or "", resp.get("ContentLength"), _read_at_most(resp["Body"], most)

    def open(self, key: str, name: str) -> BinaryIO:
        first, size = self.read_range(key, 0, FIRST_READ - 1, name)
        return _RangedReader(self, key, name, first, size)  # type: ignore[return-value]

    def put(self, key: str, data: bytes) -> None:
        with self.errors(f"writing {key}"):
            if self.lean is not None:
                try:
                    return self.lean.put(self._key(key), data)
                except Redirected:
                    self.lean = None
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self.errors(f"writing {key}"):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                        return False
                    raise
        except FileNotFoundError:
            raise StorageUnavailableError(f"{self.location}: writing {key}: refused (404)") from None
        return True

    def put_point(self, key: str, data: bytes, ttl: int) -> None:
        """Create the restore point ``key`` (never replacing one) with the client whose retries and timeouts
        end within ``point_write_seconds(ttl)``; our own PUT retried after its answer was lost is recognised by
        its bytes."""
        if self._point_client is None:
            self._point_client = make_client(point_ttl=ttl)
        from botocore.exceptions import ClientError

        budget = point_write_seconds(ttl)
        try:
            with self.errors(f"writing {key}"):
                try:
                    self._point_client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                    return
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in (
                        "PreconditionFailed",
                        "ConditionalRequestConflict",
                    ):
                        raise
        except (StorageUnavailableError, FileNotFoundError) as exc:
            raise StorageUnavailableError(
                f"{exc}; the restore point was not committed (its write is given {budget:.0f} s, half the "
                "backup's lease): run the backup again"
            ) from None
        if self.get(key, key, len(data)) != data:
            raise IntegrityError(f"{self.location}: restore point {key} exists already: not replaced")

    def exists(self, key: str) -> bool:
        try:
            with self.errors(f"looking up {key}"):
                if self.lean is not None:
                    try:
                        self.lean.head(self._key(key))
                        return True
                    except Redirected:
                        self.lean = None
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        if self._gc_lease is not None:  # a collector paused or cut off past its lease must not delete what a
            self._gc_lease.check()  # backup that has since started deduplicated against
        with self.errors(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._pages(prefix):
            yield from self._infos(page)

    def list_with_time(self, prefix: str) -> tuple[list[ObjectInfo], float]:
        """The objects under ``prefix`` and the server's clock when it listed them (lease ages are judged on the
        server's clock, never ours)."""
        found: list[ObjectInfo] = []
        now = 0.0
        for page in self._pages(prefix):
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            if date and not now:
                with contextlib.suppress(TypeError, ValueError):
                    now = parsedate_to_datetime(date).timestamp()
            found.extend(self._infos(page))
        if not now:  # never fall back to our own clock: a skewed one would shorten leases and the grace period
            raise StorageUnavailableError(
                f"{self.location}: listing {prefix}: {self.endpoint} sent no usable Date header, so lease ages "
                "cannot be judged on the server's clock"
            )
        return found, now

    def _pages(self, prefix: str) -> Iterator[dict]:
        """ListObjectsV2 responses, 1,000 keys each, fetched as they are consumed (a big repository's chunk
        listing is never held whole). The endpoint is not trusted to end: every key must be under the prefix
        and greater than the one before (S3 lists in key order), so a repeated page or token, or a page that
        goes back, is one StorageUnavailableError instead of an endless or wrong listing."""
        token: dict[str, str] = {}
        full = self._root + prefix
        last = ""
        empty = 0
        while True:
            with self.errors(f"listing {prefix}"):
                page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, **token)
            keys = [obj.get("Key") for obj in page.get("Contents", [])]
            for k in keys:
                if not isinstance(k, str) or not k.startswith(full) or k <= last:
                    raise self._bad_listing(prefix, f"key {k!r} is out of order or outside {full!r}")
                last = k
            yield page
            if not page.get("IsTruncated"):
                return
            empty = 0 if keys else empty + 1
            nxt = page.get("NextContinuationToken")
            if not nxt or nxt == token.get("ContinuationToken") or empty > MAX_EMPTY_PAGES:
                raise self._bad_listing(prefix, "a truncated page without a new continuation token or any key")
            token = {"ContinuationToken": nxt}

    def _bad_listing(self, prefix: str, why: str) -> StorageUnavailableError:
        return StorageUnavailableError(f"{self.location}: listing {prefix}: {self.endpoint} answered wrongly: {why}")

    def _infos(self, page: dict) -> Iterator[ObjectInfo]:
        for obj in page.get("Contents", []):
            yield ObjectInfo(obj["Key"][len(self._root) :], obj["Size"], obj["LastModified"].timestamp())

    # --- concurrency: leases instead of flock --------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator[ChunkBatch]:
        lease = Lease(self, "backup")
        if self._point_client is None:  # made now: its making must not eat into the point write's time
            self._point_client = make_client(point_ttl=lease.ttl)
        lease.announce()  # first announce, then look: a collection that starts later sees this lease
        try:
            gc = [le for le in live_leases(self) if le.kind == "gc"]
            if gc:
                raise _locked(self, "back up", f"garbage collection is running ({gc[0].key})")
            lease.keep_alive()
            batch = _S3Batch(self, lease)
            try:
                yield batch
            finally:
                batch.close()
        finally:
            lease.release()

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        lease = Lease(self, "gc", key=GC_LEASE)
        while True:
            busy = lease.take()
            if busy is None:
                break
            if not wait:
                raise _locked(self, "collect garbage in", busy)
            time.sleep(1)
        try:
            self._gc_now = lease.server_time
            lease.keep_alive()
            self._gc_lease = lease
            yield
        finally:
            self._gc_now = self._gc_lease = None
            lease.release()

    def collectable_before(self) -> float:
        now = self._gc_now or time.time()
        return now - gc_grace_seconds()

    def clean_stale(self) -> None:
        for info in expired_leases(self):
            self.delete(info.key)


def _read_at_most(body, n: int) -> bytes:  # noqa: ANN001 - botocore's StreamingBody
    """Up to ``n`` bytes of ``body``, to its end if shorter: the last, empty read makes botocore check the bytes
    against the announced Content-Length (a cut-off answer is an error, never a short object). The common answer
    comes in one read and is returned as is: joining copies 16 MiB per pack run."""
    parts, got = [], 0
    while got < n:
        part = body.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _locked(store: S3Store, what: str, why: str) -> RepositoryLockedError:
    return RepositoryLockedError(f"cannot {what} repository {store.location}: {why}; try again shortly")


class _S3Batch(ChunkBatch):
    """Chunks are PUT as they are staged (durable when the PUT returns); publish only checks the lease.

    The dedup check is one listing of ``chunks/`` (1,000 ids per request) made at the first lookup, not a HEAD
    per chunk: the lease keeps garbage collection away, so what was listed stays; a chunk another backup adds
    meanwhile is at worst PUT twice, with the same bytes. The listed ids are kept in a temporary file, not in
    memory (``chunkids``)."""

    def __init__(self, store: S3Store, lease: Lease) -> None:
        self.store = store
        self.lease = lease
        self._known: ChunkIds | None = None
        self._lock = threading.Lock()

    def has(self, key: str) -> bool:
        if self._known is None:
            with self._lock:
                if self._known is None:
                    listing = (info.key for info in self.store.list("chunks/"))
                    self._known = ChunkIds(listing, self.store.location)
        return key in self._known

    def close(self) -> None:
        if self._known is not None:
            self._known.close()

    def stage(self, key: str, blob: bytes) -> None:
        self.store.put(key, blob)

    def publish(self) -> None:
        self.check_alive()

    def check_alive(self) -> None:
        self.lease.check()

    def write_point(self, key: str, data: bytes) -> None:
        # The lease is checked last, right before the write, and the write ends within half a lease: a point
        # never becomes visible after its writer's lease could have lapsed (a collector may then have deleted
        # chunks it deduplicated against).
        self.lease.check()
        self.store.put_point(key, data, self.lease.ttl)


class _RangedReader(io.RawIOBase):
    """A read-only, seekable view of one object that fetches what is read with ranged GETs (the first
    ``FIRST_READ`` bytes came with the open)."""

    def __init__(self, store: S3Store, key: str, name: str, first: bytes, size: int) -> None:
        super().__init__()
        self.store, self.key, self.name = store, key, name
        self._first = first
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)  # never more than it holds
        if end <= self._pos:
            return b""
        if end <= len(self._first):
            data = self._first[self._pos : end]
        else:
            data, _ = self.store.read_range(self.key, self._pos, end - 1, self.name)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

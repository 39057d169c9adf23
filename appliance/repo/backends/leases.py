"""Lease objects: the S3 store's stand-in for ``flock``.

A lease is an object under ``locks/`` whose name says its kind and lifetime
(``locks/backup.<uuid>.<ttl>s``, ``locks/gc.<ttl>s``) and whose body names its holder for an operator. It is
*live* while the server's clock is less than its LastModified plus its lifetime; its holder re-PUTs it every
quarter of that lifetime (a heartbeat thread), and deletes it when done. A crashed holder's lease simply expires.

The rule (Dekker's: announce first, then look):
- a backup PUTs its lease, then lists ``locks/``: a live GC lease makes it withdraw (RepositoryLockedError);
- garbage collection creates ``locks/gc.*`` with ``If-None-Match: *`` (one collector at a time where the store
  supports conditional writes, as Ceph RGW and AWS do), then lists: a live backup lease makes it withdraw.
Whichever announced second sees the other, so a backup and a collection never both proceed. A backup also checks,
before it PUTs its point, that its last successful heartbeat is younger than half the lifetime: a backup cut off
from the store longer than that gives up rather than commit a point a collection may have raced.
Ages are judged on the server's clock (the Date of the listing), never against the local one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.errors import BootbackError, RepositoryLockedError

if TYPE_CHECKING:
    from appliance.repo.backends.s3 import S3Store

PREFIX = "locks/"
GC_LEASE = "gc"
DEFAULT_TTL = 120
DEFAULT_GC_GRACE = 3600
_NAME_RE = re.compile(r"locks/(backup\.[0-9a-f]{32}|gc)\.(\d{1,6})s")


def lease_ttl() -> int:
    """Seconds a lease lives without a heartbeat ($BOOTBACK_S3_LEASE_SECONDS, default 120)."""
    return max(3, int(os.environ.get("BOOTBACK_S3_LEASE_SECONDS", DEFAULT_TTL)))


def gc_grace_seconds() -> int:
    """How old an unreferenced chunk must be before garbage collection deletes it
    ($BOOTBACK_S3_GC_GRACE_SECONDS, default one hour)."""
    return max(0, int(os.environ.get("BOOTBACK_S3_GC_GRACE_SECONDS", DEFAULT_GC_GRACE)))


@dataclass(frozen=True)
class LeaseInfo:
    key: str
    kind: str  # "backup" or "gc"
    live: bool


def _leases(store: S3Store) -> tuple[list[LeaseInfo], float]:
    infos, now = store.list_with_time(PREFIX)
    out = []
    for info in infos:
        m = _NAME_RE.fullmatch(info.key)
        if m is None:
            continue  # not ours: ignored, never deleted
        kind = "gc" if m.group(1) == GC_LEASE else "backup"
        out.append(LeaseInfo(info.key, kind, now < info.mtime + int(m.group(2))))
    return out, now


def live_leases(store: S3Store) -> list[LeaseInfo]:
    return [le for le in _leases(store)[0] if le.live]


def expired_leases(store: S3Store) -> list[LeaseInfo]:
    return [le for le in _leases(store)[0] if not le.live]


class Lease:
    """One lease held by this process, renewed by a heartbeat thread until released."""

    def __init__(self, store: S3Store, kind: str, key: str | None = None) -> None:
        self.store = store
        self.kind = kind
        self.ttl = lease_ttl()
        name = key or f"backup.{uuid.uuid4().hex}"
        self.key = f"{PREFIX}{name}.{self.ttl}s"
        self.server_time: float | None = None
        self._renewed = 0.0  # monotonic time at which the last successful PUT was sent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._id = uuid.uuid4().hex  # tells our own lease from another holder's
        self._lapsed = False  # a renewal came more than ttl/2 after the one before: the lease may have expired

    def _body(self) -> bytes:
        doc = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "ttl": self.ttl, "id": self._id}
        return json.dumps(doc).encode()

    def announce(self) -> None:
        sent = time.monotonic()
        self.store.put(self.key, self._body())
        self._renewed, self._held = sent, True

    def take(self) -> str | None:
        """For garbage collection: create the GC lease, then look for live backups. None when taken; else why
        not (and nothing is held)."""
        for _attempt in range(2):
            sent = time.monotonic()
            if self.store.put_new(self.key, self._body()) or self._is_ours():
                break  # created; or created by our own PUT, retried by the client after its answer was lost
            others = [le for le in _leases(self.store)[0] if le.kind == "gc"]
            if any(le.live for le in others):
                return "garbage collection is already running"
            for le in others:  # a crashed collector's: expired, so it is taken over (once)
                self.store.delete(le.key)
        else:
            return "garbage collection is already running"
        self._renewed, self._held = sent, True
        leases, self.server_time = _leases(self.store)
        backups = [le for le in leases if le.kind == "backup" and le.live]
        if backups:
            self.release()
            return f"a backup is running ({backups[0].key})"
        return None

    def _is_ours(self) -> bool:
        try:
            doc = json.loads(self.store.get(self.key, f"lease {self.key}", 4096))
        except (FileNotFoundError, BootbackError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("id") == self._id

    def keep_alive(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.kind}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            sent = time.monotonic()
            try:
                self.store.put(self.key, self._body())
            except BootbackError:
                continue  # the store is away: check() tells the holder once the lease may have lapsed
            if sent - self._renewed > self.ttl / 2:
                self._lapsed = True  # a collector may have seen it expired meanwhile: renewing does not undo that
            self._renewed = sent

    def check(self) -> None:
        """RepositoryLockedError if the lease may have expired on the server, now or at any time since it was
        taken (no successful heartbeat for ttl/2): a lease renewed after a gap is not trusted again."""
        age = time.monotonic() - self._renewed
        if not self._held or self._lapsed or age > self.ttl / 2:
            who = "this backup" if self.kind == "backup" else "garbage collection"
            then = "nothing was committed: run it again" if self.kind == "backup" else "it stopped deleting"
            raise RepositoryLockedError(
                f"repository {self.store.location}: {who} lost its lease (a gap of more than {self.ttl / 2:.0f} s "
                f"without a successful renewal, of a {self.ttl} s lease); it was abandoned, {then}"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held:
            self._held = False
            try:
                self.store.delete(self.key)
            except BootbackError:
                pass  # unreachable: the lease expires on its own

"""A failed sync resets the write verifier: after a failed fsync the kernel may drop the dirty pages and report
success on the next fsync, so UNSTABLE writes already answered may be lost while a later COMMIT succeeds. A new
verifier makes the client resend everything it has not seen committed (Linux's nfsd does the same)."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from appliance.cache.overlay import WriteCache
from nfsd.nfs3 import NFSv3
from nfsd.xdr import Packer
from tests.unit.test_nfs_inline_calls import record, setup

WRITE, COMMIT = 7, 21
NFS3ERR_IO, NFS3ERR_STALE = 5, 70


def _reply(parts: list) -> bytes:
    reply = b"".join(bytes(p) for p in parts)
    assert reply[20:24] == b"\0\0\0\0", reply[:24].hex()  # accepted, SUCCESS
    return reply[24:]


def _verifier_of_write(body: bytes) -> tuple[int, bytes]:
    """(status, verifier) of a WRITE3res: status, wcc_data (no pre, post attributes), count, committed, verf."""
    (status,) = struct.unpack_from(">I", body)
    if status:
        return status, b""
    assert struct.unpack_from(">II", body, 4) == (0, 1)  # no pre-op attributes, post-op attributes follow
    return 0, body[-8:]


def _verifier_of_commit(body: bytes) -> tuple[int, bytes]:
    (status,) = struct.unpack_from(">I", body)
    return status, (b"" if status else body[-8:])


def test_a_failed_commit_gives_a_new_verifier_so_unstable_writes_are_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher, nfs, ext_fh, _ = setup(tmp_path)
    fh = Packer().opaque(ext_fh).bytes()
    real_fdatasync = os.fdatasync
    failing = [False]

    def fdatasync(fd: int) -> None:
        if failing[0]:
            failing[0] = False
            raise OSError(errno.EIO, "Input/output error")  # a writeback error, reported once
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def call(proc: int, args: bytes, xid: int) -> bytes:
        return _reply(await asyncio.wait_for(dispatcher.handle(record(proc, args, xid), ("127.0.0.1", 700), "tcp"), 5))

    async def scenario() -> None:
        def write(offset: int, stable: int) -> bytes:
            return fh + struct.pack(">QII", offset, 4096, stable) + Packer().opaque(b"w" * 4096).bytes()

        commit = fh + struct.pack(">QI", 0, 0)
        status, first = _verifier_of_write(await call(WRITE, write(0, 0), 1))
        assert status == 0
        assert _verifier_of_commit(await call(COMMIT, commit, 2)) == (0, first)  # nothing failed: the same one
        assert _verifier_of_write(await call(WRITE, write(4096, 0), 3)) == (0, first)
        failing[0] = True
        assert _verifier_of_commit(await call(COMMIT, commit, 4))[0] == NFS3ERR_IO
        status, after = _verifier_of_commit(await call(COMMIT, commit, 5))  # the retry's fsync succeeds ...
        assert status == 0
        assert after != first, "a failed sync must change the verifier: the write at 4096 may be lost"
        status, later = _verifier_of_write(await call(WRITE, write(8192, 0), 6))
        assert (status, later) == (0, after)  # ... and it stays until the next failure

    _run(nfs, scenario())
    # the operator hears of it: a cache disk that fails its syncs needs attention
    assert "COMMIT failed ([Errno 5] Input/output error): new write verifier" in caplog.text


def test_a_write_to_a_stopped_disk_keeps_the_verifier(tmp_path: Path) -> None:
    """ESTALE (the disk was unpublished meanwhile) loses nothing: other clients keep their uncommitted writes."""
    dispatcher, nfs, ext_fh, _ = setup(tmp_path)
    fh = Packer().opaque(ext_fh).bytes()
    before = nfs.write_verifier
    _the_cache(nfs, ext_fh).close()

    async def scenario() -> None:
        args = fh + struct.pack(">QII", 0, 4096, 0) + Packer().opaque(b"w" * 4096).bytes()
        body = _reply(await dispatcher.handle(record(WRITE, args, 1), ("127.0.0.1", 700), "tcp"))
        assert struct.unpack_from(">I", body)[0] == NFS3ERR_STALE

    _run(nfs, scenario())
    assert nfs.write_verifier == before


def _the_cache(nfs: NFSv3, handle: bytes) -> WriteCache:
    export, obj = nfs.exports.resolve(handle)
    _, folder, _ = export.backend._route(obj)
    return folder.extents[0].cache


def _run(nfs: NFSv3, scenario: Coroutine[Any, Any, None]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario)
    finally:
        nfs.close()
        loop.close()

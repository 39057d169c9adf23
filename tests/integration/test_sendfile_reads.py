"""Reads of a published disk's hydrated chunks leave the read cache's file by sendfile(2): real clients
(libnfs's ``nfs-cat``, ``qemu-io``) get exactly the backup's bytes, with the session's own writes on top, on
every pass and at every alignment, and the repository stays unchanged."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from appliance.sessions.control import ControlClient
from tests.daemon_process import DaemonProcess, bootback, tree_hash
from tests.rpcclient import NfsDir

MiB = 1 << 20


def sh(*cmd: str) -> bytes:
    p = subprocess.run(list(cmd), capture_output=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


def read_cache_used(d: DaemonProcess) -> int:
    return ControlClient(d.state).call("status")["read_cache"]["used"]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("sendfile")
    rnd = random.Random(11)
    # data, an all-zero stretch (unstored chunks: holes in the read cache's file), data, a short last chunk
    image = rnd.randbytes(9 * MiB) + bytes(3 * MiB) + rnd.randbytes(4 * MiB + 12_288)
    disk = base / "disk.raw"
    disk.write_bytes(image)
    repo = base / "repo"
    bootback("init", repo, "--chunk-size", "1M", "--encryption", "none")
    bootback("backup", repo, "--vm", "vm", disk)
    daemon = DaemonProcess(repo, base / "state", "--bind", "127.0.0.1").start()
    doc = daemon.publish("vm", mode="sandbox")
    url = f"{doc['nfs_url']}/{doc['disks'][0]['extent']}"
    yield daemon, repo, url, image, doc
    daemon.stop()


def test_hydrated_reads_are_the_backups_bytes_on_every_pass(published) -> None:
    daemon, repo, url, image, doc = published
    before = tree_hash(repo)
    stored = 13 * MiB + 12_288  # the chunks that hold data; zero chunks take nothing
    assert sh("nfs-cat", url) == image  # cold: decoded, verified, hydrated in the background
    deadline = time.monotonic() + 30
    while read_cache_used(daemon) < stored and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_cache_used(daemon) == stored
    for _ in range(2):  # from the read cache's file now
        assert sh("nfs-cat", url) == image

    # the session's writes on top: a READ mixing written blocks and backup bytes is copied, one of backup
    # bytes only is sent from the file; each comes back right at odd offsets, across chunk ends, at the end
    expected = bytearray(image)
    writes = [(2 * MiB + 65_536, 65_536, 0x5A), (10 * MiB, 4096, 0x33)]
    sh("qemu-io", "-f", "raw", *[a for o, n, v in writes for a in ("-c", f"write -P {v} {o} {n}")], url)
    for o, n, v in writes:
        expected[o : o + n] = bytes([v]) * n
    assert sh("nfs-cat", url) == bytes(expected)
    ports = ControlClient(daemon.state).call("status")["ports"]
    nfs = NfsDir(ports["mount"], ports["nfs"], doc["path"])
    fh = nfs.lookup(doc["disks"][0]["extent"])
    for o, n in [(MiB - 513, 512 * 1024), (2 * MiB + 1, MiB), (8 * MiB + 7, MiB), (len(image) - 200_001, MiB)]:
        assert nfs.read(fh, o, n) == bytes(expected[o : o + n]), f"READ of {n} at {o}"
    assert tree_hash(repo) == before

"""Repositories on S3: backup and restore through a real Ceph RGW against boto3's transfer manager moving the
same bytes to and from the same gateway, in the same run.

Input: a file of random (incompressible, undeduplicable) bytes, so both sides move the same amount of data;
our side also hashes, compresses (in vain) and frames every chunk. The anchor is ``upload_file`` /
``download_file`` (multipart, 10 threads: what ``aws s3 cp`` does). Then reads of the backed-up disk straight from
the bucket the way the daemon reads a published disk (``Repository.open_disk`` with a read cache): a cold
sequential pass (1 MiB reads), and cold 4 KiB random reads, each on a fresh reader (nothing cached).
Backup and restore run with 1 MiB chunks (the default) and 4 MiB chunks (a quarter of the requests: the cheap
lever against per-request client CPU). Client CPU per MB is reported beside the speeds (the machine is shared:
CPU time says more than wall time when others load it): ours is the ``bootback`` process's user+system time,
the anchor's this process's (boto3's threads) during the transfer.
The gateway's own CPU per MB (radosgw, the OSD and the monitor, from /proc) is reported for every transfer:
it runs on the same cores, so a request's server-side cost limits the client too. The repository's 1 MiB chunk
objects are also fetched bare, by boto3 and by the store's lean path (no decoding, no output file): the most a
restore of those objects can do on this gateway.
Each transfer (the anchor's upload and download; our backup and restore for each chunk size) starts on a fresh,
empty gateway: a memstore gateway slows as it fills, so a shared one made the order of the runs part of the result.
Run: ``./run bench s3`` (``--quick``: a smaller input, one round).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._common import (
    WORK,
    Row,
    log,
    nfs_cat_mbs,
    nfs_sha256,
    python,
    random_file,
    report,
    require_no_nfs_on_111,
    sh,
)

ROOT = Path(__file__).resolve().parent.parent
RGW = ROOT.parent / "shared" / "anchors" / "ceph-rgw.sh"
PORT = 27480
ACCESS, SECRET = "benchaccess", "benchsecret"
MiB = 1 << 20


def gateway(directory: Path) -> dict[str, str]:
    """Start (or reuse) the gateway; the AWS_* variables that reach it."""
    # CEPH_ARGS: a nearly full disk (under 1 % free) must not stop the monitor; its data is in RAM (memstore)
    env = {**os.environ, "S3_ACCESS_KEY": ACCESS, "S3_SECRET_KEY": SECRET}
    env["CEPH_ARGS"] = "--mon_data_avail_crit=0 --mon_data_avail_warn=0"
    sh("bash", RGW, "start", directory, str(PORT), env=env)
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}",
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "BOOTBACK_ENCRYPTION": "none",
    }


def fresh_rgw(directory: Path) -> None:
    """Stop the gateway at ``directory`` if one runs there, and remove it: the next ``gateway`` starts an empty one."""
    if (directory / "ceph.conf").exists():
        sh("bash", RGW, "stop", directory, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def s3_client():  # noqa: ANN201 - a boto3 client
    """The bench's own boto3 client for the gateway the AWS_* variables name (buckets, listings, the anchor)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=16,
        ),
    )


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def gateway_cpu() -> float:
    """CPU seconds used so far by the gateway's daemons (radosgw, the OSD, the monitor): they share the machine's
    cores with the client, so what one request costs the server also limits the client's throughput."""
    total = 0.0
    for pidfile in (WORK / "s3" / "rgw" / "run").glob("*.pid"):
        try:
            fields = Path(f"/proc/{int(pidfile.read_text())}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def timed(*cmd: str | Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, the gateway's CPU seconds) of one command."""
    cpu, gw, start = _children_cpu(), gateway_cpu(), time.perf_counter()
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True)
    return time.perf_counter() - start, _children_cpu() - cpu, gateway_cpu() - gw


def anchor(client, bucket: str, src: Path, dst: Path) -> dict[str, float]:  # noqa: ANN001
    """Wall and CPU seconds for boto3's transfer manager to upload ``src`` and download it again."""
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=10)
    cpu, gw, start = time.process_time(), gateway_cpu(), time.perf_counter()
    client.upload_file(str(src), bucket, "anchor.raw", Config=cfg)
    up, up_cpu, up_gw = time.perf_counter() - start, time.process_time() - cpu, gateway_cpu() - gw
    cpu, gw, start = time.process_time(), gateway_cpu(), time.perf_counter()
    client.download_file(bucket, "anchor.raw", str(dst), Config=cfg)
    down, down_cpu, down_gw = time.perf_counter() - start, time.process_time() - cpu, gateway_cpu() - gw
    return {"anchor_up": (up, up_cpu, up_gw), "anchor_down": (down, down_cpu, down_gw)}


def objects_anchor(client, location: str, size: int) -> dict[str, tuple[float, float, float]]:  # noqa: ANN001
    """Wall, CPU and gateway CPU seconds to fetch the repository's own chunk objects, 16 GETs in flight (what a
    bulk copy of its chunk or pack objects does): by boto3, and by our store's lean path alone (no decoding, no
    output file: the most a restore of these objects could do with this client on this gateway)."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.repo.backends.s3 import S3Store

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    keys = []
    for folder in ("chunks/", "packs/"):  # loose chunk objects, or pack objects
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{folder}")
        keys += [o["Key"] for page in pages for o in page.get("Contents", [])]
    store = S3Store(location)
    fetchers = {
        "objects_down": lambda k: len(client.get_object(Bucket=bucket, Key=k)["Body"].read()),
        "objects_lean": lambda k: len(store.get(k.removeprefix(f"{prefix}/"), k, 64 * MiB)),
    }
    out = {}
    for name, fetch in fetchers.items():
        cpu, gw, start = time.process_time(), gateway_cpu(), time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            n = sum(pool.map(fetch, keys))
        out[name] = (time.perf_counter() - start, time.process_time() - cpu, gateway_cpu() - gw)
        if not keys or n < size * 0.99:
            raise RuntimeError(f"{name}: {n} bytes in {len(keys)} objects for a {size}-byte disk")
    return out


def reads(location: str, size: int, expected: Path, cache_dir: Path) -> dict[str, float]:
    """Cold sequential and cold random reads through a fresh reader with a read cache, as the daemon serves a
    published disk."""
    from appliance.repo import ChunkCache, Repository
    from appliance.repo.readcache import ReadCache

    out: dict[str, float] = {}
    with open(expected, "rb") as f:
        for kind in ("sequential", "random"):
            repo = Repository.open(location)
            repo.chunk_cache = ChunkCache(0)  # nothing in memory: every chunk comes from the bucket or the cache
            point = repo.restore_point("bench")
            cache = ReadCache(cache_dir, 8 << 30)
            try:
                reader = repo.open_disk(point, point.disks[0].name, read_cache=cache)
                if kind == "sequential":
                    start = time.perf_counter()
                    for off in range(0, size, MiB):
                        data = reader.read(off, MiB)
                        f.seek(off)
                        if data != f.read(len(data)):
                            raise RuntimeError(f"wrong bytes at {off}")
                    out["seq_mb_s"] = size / (time.perf_counter() - start) / 1e6
                else:
                    rng = random.Random(1)
                    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(300)]
                    start = time.perf_counter()
                    for off in offsets:
                        reader.read(off, 4096)
                    elapsed = time.perf_counter() - start
                    out["random_reads_s"] = len(offsets) / elapsed
            finally:
                cache.close()
    return out


def published(location: str, size: int, digest: str, work: Path) -> dict[str, float]:
    """The daemon serving the bucket's repository (``serve --repo s3://...``): a published disk read over NFS by
    real clients, cold (every chunk from the bucket: ``nfs-cat`` sequential, ``qemu-img bench`` 4 KiB first
    touches), and a second session published with ``--prefetch``, read once its warm-up has finished."""
    from bench.bench_speed import first_touch_step, qemu_rate, require_ours_on_111
    from tests.daemon_process import DaemonProcess

    require_no_nfs_on_111("the daemon")
    empty = work / "no-local-repos"
    empty.mkdir(exist_ok=True)
    state = work / "daemon-state"
    shutil.rmtree(state, ignore_errors=True)
    daemon = DaemonProcess(empty, state, "--repo", location, "--bind", "127.0.0.1", repo_flag="--repo-dir").start()
    out: dict[str, float] = {}
    try:
        require_ours_on_111(daemon.nfs_port)
        reads = min(300, size // MiB)
        step = first_touch_step(size, reads)
        for kind in ("random", "seq"):
            daemon.stop()  # a fresh daemon per case: its in-memory chunk cache is shared by every session
            daemon.start()
            require_ours_on_111(daemon.nfs_port)
            doc = daemon.publish("bench", mode="sandbox")
            url = f"{doc['nfs_url']}/{doc['disks'][0]['extent']}"
            if kind == "seq":
                out["cold_seq_mb_s"] = nfs_cat_mbs(url, size)
                if nfs_sha256(url) != digest:
                    raise RuntimeError(f"{url}: other bytes than the backed-up disk")
            else:
                out["cold_random_reads_s"] = qemu_rate(url, reads, step=step)
            daemon.cli("stop", doc["id"])
        daemon.stop()  # and a fresh one for the warm-up, whose read cache holds nothing yet
        daemon.start()
        require_ours_on_111(daemon.nfs_port)
        doc = daemon.publish("bench", mode="sandbox", extra=("--prefetch",))
        started = time.perf_counter()
        while True:
            (rec,) = [r for r in json.loads(daemon.cli("sessions", "--json").stdout) if r["id"] == doc["id"]]
            if not any(w["running"] for w in rec["prefetch"] or []):
                break
            time.sleep(0.2)
        out["prefetch_s"] = time.perf_counter() - started
        url = f"{doc['nfs_url']}/{doc['disks'][0]['extent']}"
        out["prefetched_seq_mb_s"] = nfs_cat_mbs(url, size)
        out["prefetched_random_reads_s"] = qemu_rate(url, reads, step=step)
    finally:
        daemon.stop()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench s3")
    ap.add_argument("--quick", action="store_true", help="128 MiB, one round (a smoke test, not a result)")
    args = ap.parse_args(argv)
    size = (128 if args.quick else 1024) * MiB
    rounds = 1 if args.quick else 2
    work = WORK / "s3"
    work.mkdir(parents=True, exist_ok=True)
    src = random_file(work / f"random-{size >> 20}M.raw", size)
    bootback = str(Path(python()).with_name("bootback"))
    best: dict[str, float] = {}

    def keep(key: str, wall: float, cpu: float, gw: float) -> None:  # the best round's wall time, with its CPU
        if wall < best.get(key, 1e9):
            best[key], best[f"{key}_cpu"], best[f"{key}_gw"] = wall, cpu, gw

    def fresh_gateway():  # noqa: ANN202 - a boto3 client of the new gateway
        """A new, empty gateway: a memstore gateway slows as it fills (measured here: the same upload took 3.2 s
        on an empty one, 5.1 s after 3 GiB), so each transfer below starts on its own and the order in which
        they run decides nothing."""
        fresh_rgw(work / "rgw")
        os.environ.update(gateway(work / "rgw"))  # the reads below run in this process
        return s3_client()

    location_1m = ""
    try:
        for n in range(rounds):
            client = fresh_gateway()
            bucket = f"bench-{n}-anchor-{os.getpid()}"
            client.create_bucket(Bucket=bucket)
            a = anchor(client, bucket, src, work / "anchor.raw")
            log(f"round {n}: transfer manager {a['anchor_up'][0]:.1f} s / {a['anchor_down'][0]:.1f} s")
            keep("anchor_up", *a["anchor_up"])
            keep("anchor_down", *a["anchor_down"])
            for chunk in ("4M", "1M"):  # 1M last: the reads after the last round use its repository and gateway
                client = fresh_gateway()
                bucket = f"bench-{n}-{chunk.lower()}-{os.getpid()}"
                client.create_bucket(Bucket=bucket)
                location = f"s3://{bucket}/repo"
                subprocess.run([bootback, "init", location, "--chunk-size", chunk], check=True, capture_output=True)
                up = timed(bootback, "backup", location, "--vm", "bench", "--name", "disk.raw", src)
                down = timed(bootback, "restore", location, "bench", "-o", work / "restored.raw")
                if (work / "restored.raw").read_bytes() != src.read_bytes():
                    raise RuntimeError("the restored disk differs from the input")
                keep(f"ours_up_{chunk}", *up)
                keep(f"ours_down_{chunk}", *down)
                log(
                    f"round {n}, {chunk} chunks: backup {up[0]:.1f} s ({up[1]:.1f} s CPU), restore {down[0]:.1f} s "
                    f"({down[1]:.1f} s CPU)"
                )
                if chunk == "1M":
                    keep("command", *timed(bootback, "points", location))  # startup, client, one listing
                    location_1m = location
                    o = objects_anchor(client, location, size)
                    keep("objects_down", *o["objects_down"])
                    keep("objects_lean", *o["objects_lean"])
                    log(
                        f"round {n}: the same 1 MiB chunk objects fetched by boto3 {o['objects_down'][0]:.1f} s, "
                        f"by the lean path {o['objects_lean'][0]:.1f} s"
                    )
        r = reads(location_1m, size, src, work / "readcache")
        nfs = published(location_1m, size, hashlib.sha256(src.read_bytes()).hexdigest(), work)
        log(f"published disk over NFS: {nfs}")
    finally:
        sh("bash", RGW, "stop", work / "rgw", check=False)
        for name in ("restored.raw", "anchor.raw"):
            (work / name).unlink(missing_ok=True)
    mb = size / 1e6

    def cpu_ms_per_mb(key: str) -> float:
        return best[f"{key}_cpu"] * 1000 / mb

    def gw_ms_per_mb(key: str) -> float:
        return best[f"{key}_gw"] * 1000 / mb

    rows = []
    for chunk in ("1M", "4M"):
        rows += [
            Row(
                f"backup to S3 ({chunk} chunks) vs transfer manager upload",
                mb / best[f"ours_up_{chunk}"],
                mb / best["anchor_up"],
                "MB/s",
                ">= 0.8",
            ),
            Row(
                f"restore from S3 ({chunk} chunks) vs transfer manager download",
                mb / best[f"ours_down_{chunk}"],
                mb / best["anchor_down"],
                "MB/s",
                ">= 0.8",
            ),
            Row(
                f"backup CPU ({chunk} chunks) vs upload CPU",
                cpu_ms_per_mb(f"ours_up_{chunk}"),
                cpu_ms_per_mb("anchor_up"),
                "CPU ms/MB",
            ),
            Row(
                f"restore CPU ({chunk} chunks) vs download CPU",
                cpu_ms_per_mb(f"ours_down_{chunk}"),
                cpu_ms_per_mb("anchor_down"),
                "CPU ms/MB",
            ),
            Row(
                f"gateway CPU during backup ({chunk} chunks) vs during upload",
                gw_ms_per_mb(f"ours_up_{chunk}"),
                gw_ms_per_mb("anchor_up"),
                "CPU ms/MB",
            ),
            Row(
                f"gateway CPU during restore ({chunk} chunks) vs during download",
                gw_ms_per_mb(f"ours_down_{chunk}"),
                gw_ms_per_mb("anchor_down"),
                "CPU ms/MB",
            ),
        ]
    rows += [
        Row(
            "restore from S3 (1M chunks) vs boto3 fetching the same chunk objects (16 threads)",
            mb / best["ours_down_1M"],
            mb / best["objects_down"],
            "MB/s",
        ),
        Row(
            "restore CPU (1M chunks) vs fetching the same chunk objects",
            cpu_ms_per_mb("ours_down_1M"),
            cpu_ms_per_mb("objects_down"),
            "CPU ms/MB",
        ),
        Row(
            "the same chunk objects fetched by our lean path (16 threads) vs the transfer manager download",
            mb / best["objects_lean"],
            mb / best["anchor_down"],
            "MB/s",
        ),
        Row(
            "client CPU fetching the same chunk objects: lean path vs boto3",
            cpu_ms_per_mb("objects_lean"),
            cpu_ms_per_mb("objects_down"),
            "CPU ms/MB",
        ),
        Row(
            "gateway CPU fetching the same chunk objects (lean) vs the transfer manager's download",
            gw_ms_per_mb("objects_lean"),
            gw_ms_per_mb("anchor_down"),
            "CPU ms/MB",
        ),
        Row(
            "cold sequential read of the disk (read cache, 1M chunks) vs restore",
            r["seq_mb_s"],
            mb / best["ours_down_1M"],
            "MB/s",
            ">= 0.8",
        ),
        Row("cold 4 KiB random reads from S3 (1M chunks)", r["random_reads_s"], 0, "reads/s"),
        Row(
            "fixed cost of one bootback command (points: startup, S3 client, one listing), wall vs CPU",
            best["command"],
            best["command_cpu"],
            "s",
        ),
        Row(
            "published disk over NFS, cold sequential (nfs-cat) vs restore",
            nfs["cold_seq_mb_s"],
            mb / best["ours_down_1M"],
            "MB/s",
            ">= 0.8",
        ),
        Row(
            "published disk over NFS, cold 4 KiB first touches (qemu-img bench)",
            nfs["cold_random_reads_s"],
            0,
            "reads/s",
        ),
        Row(
            "published with --prefetch, after its warm-up: sequential vs cold",
            nfs["prefetched_seq_mb_s"],
            nfs["cold_seq_mb_s"],
            "MB/s",
        ),
        Row(
            "published with --prefetch, after its warm-up: 4 KiB reads vs cold",
            nfs["prefetched_random_reads_s"],
            nfs["cold_random_reads_s"],
            "reads/s",
        ),
        Row("--prefetch warm-up of the whole disk vs restore", nfs["prefetch_s"], best["ours_down_1M"], "s"),
    ]
    report(
        "s3",
        "./run bench s3",
        rows,
        {"input_bytes": size, "rounds": rounds, "seconds": best, "reads": r, "published": nfs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

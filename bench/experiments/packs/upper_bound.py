"""What pack objects would give an S3 backup, measured before building them (issue 11).

A throw-away prototype (``prototype.patch``, applied to a copy of the tree, never to ``main``): with
``BOOTBACK_PROTO_PACK=BYTES`` a backup's batch concatenates its chunk objects into objects of about that size
instead of PUTting each (no index: the result cannot be restored, only timed); ``BOOTBACK_PROTO_SKIPZ=1`` also
stores incompressible chunks with zstd's fastest level. Per chunk size, on a fresh private Ceph RGW: a backup of the
bench's 1 GiB of random bytes loose, packed, packed without compression, then boto3's transfer manager uploading
the same file (the anchor of ``bench/bench_s3.py``). Prints wall, client CPU and gateway CPU seconds.

    rm -rf /tmp/proto && mkdir /tmp/proto && git archive dce445d | tar -x -C /tmp/proto  # the patch's base
    (cd /tmp/proto && patch -p1 < bench/experiments/packs/prototype.patch)
    .venv/bin/python bench/experiments/packs/upper_bound.py   # PROTO=/tmp/proto ROUNDS=2 SRC=...
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import bench.bench_s3 as b  # noqa: E402 - after the path

PROTO = os.environ.get("PROTO", "/tmp/proto")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
PACK = os.environ.get("PACK", str(16 << 20))
SRC = Path(os.environ.get("SRC", "/var/tmp/bootback-bench/s3/random-1024M.raw"))
WORK = Path("/var/tmp/packproto")
VARIANTS = (
    ("loose", {}),
    ("pack", {"BOOTBACK_PROTO_PACK": PACK}),
    ("pack-skipz", {"BOOTBACK_PROTO_PACK": PACK, "BOOTBACK_PROTO_SKIPZ": "1"}),
)


def main() -> None:
    b.WORK, b.PORT = WORK, 27480  # gateway_cpu() reads WORK/s3/rgw/run
    rgw = WORK / "s3" / "rgw"
    rgw.parent.mkdir(parents=True, exist_ok=True)
    bootback = str(ROOT / ".venv" / "bin" / "bootback")

    def fresh() -> None:  # memstore frees deleted objects only after RGW's gc: a new cluster per chunk size
        b.sh("bash", b.RGW, "stop", rgw, check=False)
        shutil.rmtree(rgw, ignore_errors=True)
        os.environ.update(b.gateway(rgw))

    def run(cmd: list[str], extra: dict[str, str]) -> tuple[float, float, float]:
        r0, gw0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), b.gateway_cpu(), time.perf_counter()
        subprocess.run(
            cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": PROTO, **extra}, cwd=PROTO
        )
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return time.perf_counter() - t0, cpu, b.gateway_cpu() - gw0

    fresh()
    client = b.s3_client()
    mb = SRC.stat().st_size / 1e6
    try:
        for n in range(ROUNDS):
            for chunk in ("1M", "4M"):
                fresh()
                for variant, extra in VARIANTS:
                    bucket = f"p{n}-{chunk.lower()}-{variant}-{os.getpid()}"
                    client.create_bucket(Bucket=bucket)
                    loc = f"s3://{bucket}/repo"
                    run([bootback, "init", loc, "--chunk-size", chunk], {})
                    wall, cpu, gw = run(
                        [bootback, "backup", loc, "--vm", "bench", "--name", "disk.raw", str(SRC)], extra
                    )
                    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                    count = sum(p.get("KeyCount", 0) for p in pages)
                    print(
                        f"round {n} {chunk} {variant}: {mb / wall:.0f} MB/s, wall {wall:.1f} s, CPU {cpu:.1f} s, "
                        f"gateway {gw:.1f} s, {count} objects",
                        flush=True,
                    )
                bucket = f"anchor-{n}-{chunk.lower()}-{os.getpid()}"
                client.create_bucket(Bucket=bucket)
                wall, cpu, gw = b.anchor(client, bucket, SRC, WORK / "anchor.raw")["anchor_up"]
                print(
                    f"round {n} {chunk} transfer manager: {mb / wall:.0f} MB/s, wall {wall:.1f} s, CPU {cpu:.1f} s, "
                    f"gateway {gw:.1f} s",
                    flush=True,
                )
                (WORK / "anchor.raw").unlink(missing_ok=True)
    finally:
        b.sh("bash", b.RGW, "stop", rgw, check=False)


if __name__ == "__main__":
    main()

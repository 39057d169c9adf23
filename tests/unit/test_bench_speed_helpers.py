"""The measuring helpers of ``bench speed``: server CPU over a process tree, targets, the first-touch stride."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bench._common import MiB, Row, cpu_meter
from bench.bench_speed import first_touch_step

BURN = (
    "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nprint('burnt', flush=True)\n"
)


def test_cpu_meter_counts_live_grandchildren_and_reaped_children() -> None:
    """A server that hands work to worker processes must be measured whole: a grandchild still running when
    the meter stops, and a child already reaped, both count."""
    live = BURN + "time.sleep(30)\n"
    middle = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {live!r}])\n"
    with cpu_meter(os.getpid()) as cpu:
        p = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "burnt"  # the grandchild burnt its CPU and now sleeps, alive
    try:
        assert cpu["cpu_s"] >= 0.45, cpu
        assert cpu["cores"] > 0
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    with cpu_meter(os.getpid()) as reaped:
        subprocess.run([sys.executable, "-c", BURN], check=True, capture_output=True)
    assert reaped["cpu_s"] >= 0.45, reaped


def test_row_targets_bound_the_ratio_or_our_own_figure() -> None:
    assert Row("writes", 9, 10, "writes/s", ">= 0.9").met is True
    assert Row("writes", 8, 10, "writes/s", ">= 0.9").met is False
    assert Row("p99", 9.5, 3.0, "ms", "ours < 10").met is True  # ratio 3.2: the target is on ours alone
    assert Row("p99", 10.0, 30.0, "ms", "ours < 10").met is False
    assert Row("info", 1, 2, "x").met is None


def test_first_touch_stride_puts_every_read_in_a_new_chunk() -> None:
    """qemu-img bench adds the stride and wraps (qemu 7.2: modulo the size; newer: modulo size - 4 KiB)."""
    for size, count in ((1 << 30, 1000), (256 * MiB, 200)):
        step = int(first_touch_step(size, count).removesuffix("k")) * 1024
        assert step % 4096 == 0 and step > 8 * MiB  # aligned, and not a stride read-ahead would follow
        for wrap in (size, size - 4096):
            offsets = [0]
            for _ in range(count - 1):
                offsets.append((offsets[-1] + step) % wrap)
            assert len({o // MiB for o in offsets}) == count
            assert all(o + 4096 <= size for o in offsets)

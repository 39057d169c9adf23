"""The write cache against a model: any size and alignment, extension, truncation, persistence."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.cache.overlay import WriteCache
from appliance.errors import IntegrityError

SIZE = 3 * 1024 * 1024 + 1000
BLOCK = 64 * 1024


def backing_for(data: bytes):
    return lambda off, n: data[off : off + n]


@pytest.fixture
def base() -> bytes:
    return random.Random(1).randbytes(SIZE)


@pytest.mark.parametrize("aligned_share", [0.0, 0.7])  # 0.7: mostly whole 4 KiB sectors, as guests write
def test_random_writes_match_a_model_and_survive_reopen(tmp_path: Path, base: bytes, aligned_share: float) -> None:
    model = bytearray(base)
    cache = WriteCache(tmp_path, "d", backing_for(base), SIZE)
    rnd = random.Random(2)
    for i in range(300):
        if rnd.random() < aligned_share:  # partly written blocks: no copy-in
            off, n = rnd.randrange(0, SIZE // 4096) * 4096, 4096 * rnd.choice([1, 1, 2, 3, 8, 17])
        else:
            off, n = rnd.randrange(0, SIZE), rnd.choice([1, 7, 512, 4096, BLOCK - 1, BLOCK, BLOCK + 3, 200_000])
        data = rnd.randbytes(n)
        cache.write(off, data, sync=i % 3 == 0)
        if off + n > len(model):
            model.extend(bytes(off + n - len(model)))
        model[off : off + n] = data
        if i % 100 == 99:  # masks and bits as a reopened cache reads them
            cache.close()
            cache = WriteCache(tmp_path, "d", backing_for(base), SIZE)
        if i % 50 == 0:
            o = rnd.randrange(0, len(model))
            assert cache.read(o, 100_000) == bytes(model[o : o + 100_000])
    cache.commit()
    assert cache.size == len(model)
    assert cache.read(0, len(model) + 10) == bytes(model)
    cache.close()
    again = WriteCache(tmp_path, "d", backing_for(base), SIZE)
    assert again.size == len(model) and again.read(0, len(model)) == bytes(model)
    # the data file is sparse: only touched blocks take space
    assert again.usage_bytes() < len(model) * 2


def test_untouched_blocks_come_from_the_backup_and_cache_is_sparse(tmp_path: Path, base: bytes) -> None:
    cache = WriteCache(tmp_path, "d", backing_for(base), SIZE)
    cache.write(BLOCK + 10, b"x" * 10, sync=True)
    assert cache.cached_blocks() == 0 and cache.changed_bytes() == 4096  # one sector of block 1, copied in
    assert cache.read(0, SIZE) == base[: BLOCK + 10] + b"x" * 10 + base[BLOCK + 20 :]
    assert cache.usage_bytes() <= 4 * BLOCK


def test_truncate_then_extend_reads_zeros_not_backup(tmp_path: Path, base: bytes) -> None:
    cache = WriteCache(tmp_path, "d", backing_for(base), SIZE)
    cache.truncate(BLOCK + 100)
    assert cache.read(0, SIZE) == base[: BLOCK + 100]
    cache.truncate(4 * BLOCK)
    assert cache.read(0, 4 * BLOCK) == base[: BLOCK + 100] + bytes(3 * BLOCK - 100)
    cache.write(3 * BLOCK, b"end", sync=True)
    cache.close()
    again = WriteCache(tmp_path, "d", backing_for(base), SIZE)
    assert again.read(0, 4 * BLOCK) == base[: BLOCK + 100] + bytes(2 * BLOCK - 100) + b"end" + bytes(BLOCK - 3)


def test_damaged_map_is_refused(tmp_path: Path, base: bytes) -> None:
    WriteCache(tmp_path, "d", backing_for(base), SIZE).close()
    (tmp_path / "d.map").write_bytes(b"junk" * 20)
    with pytest.raises(IntegrityError, match="not a bootback write cache"):
        WriteCache(tmp_path, "d", backing_for(base), SIZE)


CRASH_WRITER = r"""
import os, random, sys
sys.path.insert(0, sys.argv[3])
from appliance.cache.overlay import WriteCache
base = random.Random(1).randbytes(int(sys.argv[2]))
cache = WriteCache(sys.argv[1], "d", lambda o, n: base[o:o+n], len(base))
rnd = random.Random(5)
align = int(sys.argv[4])  # 4096: whole sectors (partly written blocks, no copy-in); 1: any offset
sync = sys.argv[5] == "stable"  # unstable: the page cache keeps them, copy-ins' map changes in the pending log
i = 0
while True:
    off = rnd.randrange(0, len(base) - 70000) // align * align
    data = bytes([i % 251 + 1]) * rnd.choice([512, 4096, 70000])
    cache.write(off, data, sync=sync)
    os.write(1, f"{off} {len(data)} {i % 251 + 1}\n".encode())   # acknowledged; one write(2): never half a line
    i += 1
"""


@pytest.mark.parametrize(
    ("delay", "align", "how"), [(0.3, 1, "stable"), (0.8, 1, "stable"), (0.5, 4096, "stable"), (0.5, 1, "unstable")]
)
def test_acknowledged_writes_survive_sigkill(tmp_path: Path, base: bytes, delay: float, align: int, how: str) -> None:
    script = tmp_path / "writer.py"
    script.write_text(CRASH_WRITER)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "c"), str(SIZE), str(root), str(align), how],
        stdout=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # writing has begun (start-up time varies with the machine's load) ...
    time.sleep(delay)  # ... then it is killed mid-stream
    proc.kill()
    out, _ = proc.communicate()
    out = first + out
    # a line is complete only with its newline (the writer may die while its pipe is being read)
    acked = [tuple(map(int, line.split())) for line in out.split("\n")[:-1] if line.strip()]
    assert acked, "the writer acknowledged nothing before it was killed"
    model = bytearray(base)
    for off, n, v in acked:
        model[off : off + n] = bytes([v]) * n
    cache = WriteCache(tmp_path / "c", "d", backing_for(base), SIZE)
    got = cache.read(0, SIZE)
    # every acknowledged write is there; at most the one in flight differs, and only inside its own range
    diff = [i for i in range(0, SIZE, 512) if got[i : i + 512] != model[i : i + 512]]
    if diff:
        rnd = random.Random(5)
        for _ in range(len(acked)):
            rnd.randrange(0, SIZE - 70000), rnd.choice([512, 4096, 70000])
        off, n = rnd.randrange(0, SIZE - 70000) // align * align, rnd.choice([512, 4096, 70000])
        assert all(off - 512 < i < off + n for i in diff), "a torn write damaged other blocks"
    assert os.path.exists(tmp_path / "c" / "d.map")

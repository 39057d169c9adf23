"""Issue 10's speed cases: cold, warm, write, many-VM and heartbeat, each against nfs-ganesha in the same run.

Inputs (random bytes, so nothing compresses or deduplicates): a 1 GiB disk ``big`` and eight 128 MiB disks
``vm0``..``vm7``, backed up into a fresh repository each run. Our side runs ``bootback serve`` on the default
ports (qemu asks the portmapper on 111) and publishes sandboxes; every "cold" case starts a fresh daemon
(empty read cache and chunk LRU) right after the chunk files were read (page cache warm). Then ganesha serves
the raw images (page cache warm) and the same clients run against it.

Cases: 4 KiB random writes qd16; cold sequential read of ``big``; cold 4 KiB random reads qd16 whose every
read falls in a chunk not read before; warm 4 KiB reads qd16 with the server's CPU microseconds per call
(robust on a busy machine, unlike throughput); 8 sessions read by 8 concurrent clients on their own
connections (``nfs-cat`` and ``qemu-img bench``), aggregate rate and the server's cores used (utime+stime of
its process tree / wall time); a GETATTR every 50 ms on its own connection while two cold sequential
readers and a 64 KiB qd32 random reader run (p50/p99/max latency).
Run: ``./run bench speed`` (``--quick``: small counts and disks, a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from bench._common import (
    WORK,
    MiB,
    Row,
    cpu_meter,
    file_sha256,
    ganesha,
    log,
    nfs_cat_mbs,
    nfs_sha256,
    port_owner,
    qemu_bench_cmd,
    qemu_bench_seconds,
    random_file,
    report,
    require_no_nfs_on_111,
    rpc_tcp_ports,
    sh,
    warm_page_cache,
)

if TYPE_CHECKING:
    from tests.daemon_process import DaemonProcess

HERE = WORK / "speed"
CHUNK = MiB  # the repository's chunk size (bootback init's default, given explicitly below)
VMS = 8
HEARTBEAT_S = 0.05
GANESHA_NFS_PORT = 12049  # ganesha.sh's default


@dataclass(frozen=True)
class Counts:
    big_mib: int  # the disk of the single-VM cases
    vm_mib: int  # each of the 8 disks of the many-VM and heartbeat cases
    cold_reads: int  # first-touch 4 KiB reads: at most one per chunk
    warm_reads: int
    writes: int
    many_reads: int  # per client
    reps: int  # best of, for the cases that are cheap to repeat
    heartbeat_max_s: float


FULL = Counts(1024, 128, 1000, 60_000, 40_000, 20_000, 2, 60)
QUICK = Counts(256, 32, 200, 10_000, 5_000, 3_000, 1, 30)


# --- inputs -----------------------------------------------------------------------------------------------
def inputs(c: Counts) -> dict[str, Path]:
    d = WORK / "inputs" / "speed"
    disks = {"big": random_file(d / f"big-{c.big_mib}M.raw", c.big_mib * MiB)}
    for i in range(VMS):
        disks[f"vm{i}"] = random_file(d / f"vm{i}-{c.vm_mib}M.raw", c.vm_mib * MiB)
    return disks


def make_repo(disks: dict[str, Path]) -> Path:
    from tests.daemon_process import bootback

    repo = HERE / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    bootback("init", repo, "--chunk-size", "1M", "--encryption", "none")
    for vm, image in disks.items():
        bootback("backup", repo, "--vm", vm, image)
    return repo


def first_touch_step(size: int, count: int) -> str:
    """A ``qemu-img bench -S`` stride that puts each of ``count`` 4 KiB reads in a chunk not read before,
    jumping across the disk (a stride of about one chunk would let read-ahead guess the next one).
    qemu 7.2 wraps the offset modulo the image size; newer qemu modulo (size - 4 KiB): both are checked."""
    chunks = size // CHUNK
    for k in range(chunks // 3, chunks):
        step = k * CHUNK + 4096
        if all(_distinct_chunks(size, count, step, wrap) for wrap in (size, size - 4096)):
            return f"{step // 1024}k"
    raise ValueError(f"no first-touch stride for {count} reads over {size} bytes")


def _distinct_chunks(size: int, count: int, step: int, wrap: int) -> bool:
    offset, seen = 0, set()
    for _ in range(count):
        seen.add(offset // CHUNK)
        offset = (offset + step) % wrap
    return len(seen) == count


# --- clients ----------------------------------------------------------------------------------------------
def qemu_rate(url: str, count: int, **kw: Any) -> float:
    return count / qemu_bench_seconds(sh(*qemu_bench_cmd(url, count, **kw)).stdout)


def concurrent(cmds: list[list[str]]) -> tuple[float, list[str]]:
    """Start every command at once, wait for all: wall seconds from the first start to the last exit."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    for cmd, p, (_, err) in zip(cmds, procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err.strip()[-1000:]}")
    return wall, [out for out, _ in outs]


def many_clients(server_pid: int, urls: list[str], size: int, reads: int) -> dict[str, Any]:
    """8 sequential readers (``nfs-cat``) at once, twice (on our side the first pass reads cold data and
    hydrates it), then 8 ``qemu-img bench`` 4 KiB qd16 at once."""
    seq = []
    for _ in range(2):
        with cpu_meter(server_pid) as seq_cpu:
            seq_wall, _ = concurrent([["sh", "-c", 'exec nfs-cat "$0" >/dev/null', u] for u in urls])
        seq.append((len(urls) * size / seq_wall / 1e6, seq_cpu["cores"]))
    with cpu_meter(server_pid) as rr_cpu:
        rr_wall, outs = concurrent([qemu_bench_cmd(u, reads) for u in urls])
    result = {
        "seq_mb_s": [rate for rate, _ in seq],
        "seq_cores": [cores for _, cores in seq],
        "reads_s": len(urls) * reads / rr_wall,
        "reads_cores": rr_cpu["cores"],
        "reads_cpu_us": rr_cpu["cpu_s"] / (len(urls) * reads) * 1e6,
        "per_client_reads_s": [reads / qemu_bench_seconds(o) for o in outs],
    }
    log(
        f"{len(urls)} clients: seq {seq[0][0]:.0f} then {seq[1][0]:.0f} MB/s ({seq[0][1]:.2f}, {seq[1][1]:.2f} cores), "
        f"4k {result['reads_s']:.0f} reads/s ({rr_cpu['cores']:.2f} cores)"
    )
    return result


class Looper(threading.Thread):
    """Runs a list of commands in turn, once or round and round until stopped (a reader of the load)."""

    def __init__(self, cmds: list[list[str]], repeat: bool) -> None:
        super().__init__(daemon=True)
        self.cmds, self.repeat = cmds, repeat
        self.passes = 0
        self.error: str | None = None
        self._stop_event = threading.Event()
        self._proc: subprocess.Popen | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            for cmd in self.cmds:
                self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                _, err = self._proc.communicate()
                if self._stop_event.is_set():
                    return
                if self._proc.returncode != 0:
                    self.error = f"{' '.join(cmd)} failed ({self._proc.returncode}): {err.strip()[-500:]}"
                    return
            self.passes += 1
            if not self.repeat:
                return

    def halt(self) -> None:
        self._stop_event.set()
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
        self.join(10)


def getattr_pinger(url: str) -> Any:
    """A GETATTR call on ``url``'s file over its own TCP connection (the raw client of the protocol tests),
    ports from the portmapper: what ESXi's heartbeat does on a datastore."""
    from nfsd.xdr import Packer
    from tests.rpcclient import NfsDir

    path = urlparse(url).path
    ports = rpc_tcp_ports()
    d = NfsDir(ports[100005], ports[100003], os.path.dirname(path))
    args = Packer().opaque(d.lookup(os.path.basename(path))).bytes()

    def ping() -> None:
        status = d.nfs.call(100003, 3, 1, args).u32()
        if status != 0:
            raise RuntimeError(f"GETATTR {url}: status {status}")

    return ping


def heartbeat(
    ping_url: str, readers: list[list[str]], random_url: str, one_pass: bool, seconds: float
) -> dict[str, Any]:
    """GETATTR every 50 ms while the sequential ``readers`` (URL lists, one ``nfs-cat`` each) and a 64 KiB qd32
    random reader run. ``one_pass``: the window ends when every reader has read its list once (cold data:
    our side), capped at ``seconds``; else the readers go round for ``seconds`` (the anchor, same duration)."""
    ping = getattr_pinger(ping_url)
    seq = [
        Looper([["sh", "-c", 'exec nfs-cat "$0" >/dev/null', u] for u in urls], repeat=not one_pass) for urls in readers
    ]
    # a stride of whole 64 KiB blocks: qemu 7.2 wraps offsets modulo the image size, so a 4 KiB-aligned stride
    # could start a 64 KiB read less than 64 KiB before the end (EIO)
    rand = Looper([qemu_bench_cmd(random_url, 1_000_000, size="64k", depth=32, step="5056k")], repeat=True)
    loads = [*seq, rand]
    latencies: list[float] = []
    start = time.perf_counter()
    for t in loads:
        t.start()
    try:
        tick = start
        while True:
            now = time.perf_counter()
            if now - start >= seconds or (one_pass and not any(t.is_alive() for t in seq)):
                break
            if any(t.error for t in loads):
                break
            t0 = time.perf_counter()
            ping()
            latencies.append((time.perf_counter() - t0) * 1000)
            tick += HEARTBEAT_S
            tick = max(tick, time.perf_counter())  # a late reply delays the next call, it does not pile up
            time.sleep(max(0.0, tick - time.perf_counter()))
        window = time.perf_counter() - start
    finally:
        for t in loads:
            t.halt()
    errors = [t.error for t in loads if t.error]
    if errors:
        raise RuntimeError(f"load under the heartbeat failed: {errors[0]}")
    if one_pass and any(t.passes < 1 for t in seq):
        log(f"heartbeat: readers not done after {seconds:.0f} s, window cut there")
    lat = sorted(latencies)
    result = {
        "window_s": window,
        "calls": len(lat),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
        "reader_passes": [t.passes for t in seq],
    }
    log(
        f"heartbeat over {window:.1f} s: {len(lat)} GETATTRs, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms"
    )
    return result


def warm_reads(server_pid: int, url: str, count: int, reps: int) -> dict[str, float]:
    """Warm 4 KiB reads qd16: the best rate of ``reps`` runs, and the least server CPU per call."""
    runs = []
    for _ in range(reps):
        with cpu_meter(server_pid) as cpu:
            rate = qemu_rate(url, count)
        runs.append((rate, cpu["cpu_s"] / count * 1e6, cpu["cores"]))
    best = max(runs)
    log(f"warm 4k qd16 {best[0]:.0f} reads/s, {min(r[1] for r in runs):.1f} server CPU us/read")
    return {"reads_s": best[0], "cpu_us": min(r[1] for r in runs), "cores": best[2]}


def writes(server_pid: int, url: str, count: int) -> dict[str, float]:
    with cpu_meter(server_pid) as cpu:
        rate = qemu_rate(url, count, write=True, step="12k")
    log(f"4k qd16 writes {rate:.0f}/s, {cpu['cpu_s'] / count * 1e6:.1f} server CPU us/write")
    return {"writes_s": rate, "cpu_us": cpu["cpu_s"] / count * 1e6}


# --- our side ---------------------------------------------------------------------------------------------
@contextmanager
def fresh_daemon(repo: Path, *vms: str) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    """A newly started daemon (read cache and chunk LRU empty, chunk files just read) with a sandbox of each
    VM's latest point published; yields it and each VM's extent URL."""
    from tests.daemon_process import DaemonProcess

    require_no_nfs_on_111("the daemon")
    state = HERE / "state"
    shutil.rmtree(state, ignore_errors=True)
    warm_page_cache(*sorted(repo.glob("chunks/*/*")))
    daemon = DaemonProcess(repo, state, "--bind", "127.0.0.1").start()
    try:
        require_ours_on_111(daemon.nfs_port)
        docs = daemon.publish(*vms, mode="sandbox")
        docs = docs if isinstance(docs, list) else [docs]
        urls = {doc["vm"]: f"{doc['nfs_url']}/{doc['disks'][0]['extent']}" for doc in docs}
        yield daemon, urls
    finally:
        daemon.stop()


def require_ours_on_111(nfs_port: int) -> None:
    """The portmapper on 111 must send qemu to the server just started: another engineer's test server can
    take 111 between our check and our start, and qemu would then talk to it."""
    registered = rpc_tcp_ports().get(100003)
    if registered != nfs_port:
        raise RuntimeError(
            f"the portmapper on 111 names NFS port {registered}, not ours ({nfs_port}): {port_owner(111)}"
        )


def pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def run_ours(repo: Path, c: Counts, digest: str, step: str) -> dict[str, Any]:
    big = c.big_mib * MiB
    vms = [f"vm{i}" for i in range(VMS)]
    out: dict[str, Any] = {"cold_reads_s": [], "cold_seq_mb_s": []}
    for _ in range(c.reps):
        with fresh_daemon(repo, "big") as (daemon, urls):
            with cpu_meter(pid(daemon)) as cpu:
                out["cold_reads_s"].append(qemu_rate(urls["big"], c.cold_reads, step=step))
            out["cold_reads_cores"] = cpu["cores"]
            log(f"ours: cold 4k qd16 first touch {out['cold_reads_s'][-1]:.0f} reads/s ({cpu['cores']:.2f} cores)")
    for rep in range(c.reps):
        with fresh_daemon(repo, "big") as (daemon, urls):
            url = urls["big"]
            with cpu_meter(pid(daemon)) as cpu:
                out["cold_seq_mb_s"].append(nfs_cat_mbs(url, big))
            out["cold_seq_cores"] = cpu["cores"]
            log(f"ours: cold sequential {out['cold_seq_mb_s'][-1]:.0f} MB/s ({cpu['cores']:.2f} cores)")
            if rep < c.reps - 1:
                continue
            # now hydrated: check the bytes, then the warm cases on the same session
            if nfs_sha256(url) != digest:
                raise RuntimeError(f"{url}: the daemon returned other bytes than the backed-up image")
            out["warm_seq_mb_s"] = max(nfs_cat_mbs(url, big) for _ in range(c.reps))
            out["warm"] = warm_reads(pid(daemon), url, c.warm_reads, c.reps)
            out["writes"] = writes(pid(daemon), url, c.writes)
    with fresh_daemon(repo, *vms) as (daemon, urls):
        out["many"] = many_clients(pid(daemon), [urls[v] for v in vms], c.vm_mib * MiB, c.many_reads)
    with fresh_daemon(repo, "big", *vms) as (daemon, urls):
        half = VMS // 2
        readers = [[urls[v] for v in vms[:half]], [urls[v] for v in vms[half:]]]
        out["heartbeat"] = heartbeat(urls["big"], readers, urls["big"], True, c.heartbeat_max_s)
    return out


# --- ganesha ----------------------------------------------------------------------------------------------
def run_ganesha(disks: dict[str, Path], c: Counts, step: str, window_s: float) -> dict[str, Any]:
    export = HERE / "ganesha"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir(parents=True)
    for vm, image in disks.items():
        os.link(image, export / f"{vm}.raw")  # the very files we backed up, no copy
    with open(export / "write.raw", "wb") as f:  # writes go to a sparse file, as ours go to a fresh cache
        f.truncate(c.big_mib * MiB)
    vms = [f"vm{i}" for i in range(VMS)]
    with ganesha(export) as server:
        require_ours_on_111(GANESHA_NFS_PORT)
        base = f"nfs://127.0.0.1{export}"
        url = f"{base}/big.raw"
        warm_page_cache(*disks.values())
        out: dict[str, Any] = {"cold_reads_s": [qemu_rate(url, c.cold_reads, step=step) for _ in range(c.reps)]}
        log(f"ganesha: 4k qd16 on the first-touch offsets {max(out['cold_reads_s']):.0f} reads/s")
        with cpu_meter(server) as cpu:
            out["seq_mb_s"] = max(nfs_cat_mbs(url, c.big_mib * MiB) for _ in range(c.reps))
        out["seq_cores"] = cpu["cores"]
        log(f"ganesha: sequential {out['seq_mb_s']:.0f} MB/s")
        out["warm"] = warm_reads(server, url, c.warm_reads, c.reps)
        out["writes"] = writes(server, f"{base}/write.raw", c.writes)
        warm_page_cache(*disks.values())
        out["many"] = many_clients(server, [f"{base}/{v}.raw" for v in vms], c.vm_mib * MiB, c.many_reads)
        warm_page_cache(*disks.values())
        half = VMS // 2
        readers = [[f"{base}/{v}.raw" for v in vms[:half]], [f"{base}/{v}.raw" for v in vms[half:]]]
        out["heartbeat"] = heartbeat(url, readers, url, False, max(window_s, 5.0))
    return out


def rows(ours: dict[str, Any], anchor: dict[str, Any]) -> list[Row]:
    om, am, oh, ah = ours["many"], anchor["many"], ours["heartbeat"], anchor["heartbeat"]
    return [
        Row(
            "4 KiB random write qd16 (-S 12k)",
            ours["writes"]["writes_s"],
            anchor["writes"]["writes_s"],
            "writes/s",
            ">= 0.9",
        ),
        Row("  server CPU per 4 KiB write", ours["writes"]["cpu_us"], anchor["writes"]["cpu_us"], "us/call"),
        Row(
            "cold sequential read, incompressible disk",
            max(ours["cold_seq_mb_s"]),
            anchor["seq_mb_s"],
            "MB/s",
            ">= 0.5",
        ),
        Row(
            "cold 4 KiB random read qd16, first touch",
            max(ours["cold_reads_s"]),
            max(anchor["cold_reads_s"]),
            "reads/s",
            ">= 0.3",
        ),
        Row("warm 4 KiB random read qd16", ours["warm"]["reads_s"], anchor["warm"]["reads_s"], "reads/s", ">= 1.0"),
        Row("  server CPU per warm 4 KiB read", ours["warm"]["cpu_us"], anchor["warm"]["cpu_us"], "us/call"),
        Row("warm sequential read", ours["warm_seq_mb_s"], anchor["seq_mb_s"], "MB/s", ">= 1.0"),
        Row("8 clients sequential, cold, aggregate", om["seq_mb_s"][0], max(am["seq_mb_s"]), "MB/s"),
        Row("  server cores used", om["seq_cores"][0], am["seq_cores"][0], "cores"),
        Row("8 clients sequential, warm, aggregate", om["seq_mb_s"][1], max(am["seq_mb_s"]), "MB/s", ">= 1.0"),
        Row("  server cores used", om["seq_cores"][1], am["seq_cores"][1], "cores"),
        Row("8 clients 4 KiB qd16, aggregate", om["reads_s"], am["reads_s"], "reads/s", ">= 1.0"),
        Row("  server cores used", om["reads_cores"], am["reads_cores"], "cores"),
        Row("heartbeat GETATTR under cold load, p50", oh["p50_ms"], ah["p50_ms"], "ms"),
        Row("heartbeat GETATTR under cold load, p99", oh["p99_ms"], ah["p99_ms"], "ms", "ours < 10"),
        Row("heartbeat GETATTR under cold load, max", oh["max_ms"], ah["max_ms"], "ms", "ours < 100"),
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench speed")
    ap.add_argument("--quick", action="store_true", help="small disks and counts (a smoke test, not a result)")
    args = ap.parse_args(argv)
    c = QUICK if args.quick else FULL
    disks = inputs(c)
    digest = file_sha256(disks["big"])
    step = first_touch_step(c.big_mib * MiB, c.cold_reads)
    log(f"backing up {len(disks)} disks into a fresh repository")
    repo = make_repo(disks)
    ours = run_ours(repo, c, digest, step)
    anchor = run_ganesha(disks, c, step, ours["heartbeat"]["window_s"])
    extra = {
        "counts": c.__dict__,
        "first_touch_step": step,
        "ours": ours,
        "ganesha": anchor,
        "qemu": sh("qemu-img", "--version").stdout.splitlines()[0],
    }
    name = "speed-quick" if args.quick else "speed"
    report(name, "./run bench speed" + (" --quick" if args.quick else ""), rows(ours, anchor), extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

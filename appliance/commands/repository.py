"""Repository subcommands: init, backup, points, restore, verify, prune."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from appliance.atomicfile import fsync_dir
from appliance.commands.keys import add_init_options, add_key_options, init_encryption, key_source
from appliance.errors import NoSpaceError, SourceError, UsageError
from appliance.ingest.backup import backup_vm
from appliance.ingest.sources import DiskSource, open_source
from appliance.ingest.vmfolder import find_vmx, parse_vmx_disks, resolve_disk
from appliance.progress import byte_progress
from appliance.repo import ChunkCache, DiskReader, Repository
from appliance.repo.backends import add_repository_argument
from appliance.repo.maintenance import prune, verify
from appliance.repo.manifest import DamagedPoint
from appliance.repo.reader import read_ahead_chunks, streaming_cache_bytes
from appliance.repo.repository import DEFAULT_CHUNK
from appliance.units import GiB, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a repository")
    add_repository_argument(p)
    p.add_argument("--chunk-size", default=str(DEFAULT_CHUNK), help="64K..4M, a power of two (default 1M)")
    p.add_argument(
        "--packs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store chunks in ~16 MiB pack objects (default: on for s3://, off for a directory)",
    )
    add_init_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("backup", help="back up a VM's disks (and .vmx) as a new restore point")
    add_repository_argument(p)
    p.add_argument("--vm", required=True, help="VM name")
    p.add_argument("--vmx", type=Path, help="the VM's .vmx; with no DISK, back up the disks it names")
    p.add_argument("--name", action="append", default=[], help="name of the disk read from stdin ('-')")
    p.add_argument("disks", nargs="*", help="disk images (raw, VMDK, qcow2, VHD, VHDX), '-' for stdin, or a VM folder")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backup, trailing="disks")

    p = sub.add_parser("points", help="list restore points")
    add_repository_argument(p)
    p.add_argument("--vm")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("restore", help="write a disk of a restore point to a file")
    add_repository_argument(p)
    p.add_argument("point", help="VM@POINT (POINT may be 'latest')")
    p.add_argument("--disk", help="disk name (default: the only disk)")
    p.add_argument("-o", "--output", required=True, help="output file, '-' for stdout")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("verify", help="check every chunk; report damaged restore points")
    add_repository_argument(p)
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="keep the newest N restore points of a VM and free unreferenced chunks")
    add_repository_argument(p)
    p.add_argument("--vm", required=True)
    p.add_argument("--keep", type=int, required=True)
    p.add_argument("--dry-run", action="store_true")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)


def _emit(args: argparse.Namespace, doc: object, text: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if args.json else text)


def cmd_init(args: argparse.Namespace) -> int:
    encryption, source = init_encryption(args)
    repo = Repository.init(args.repo, parse_size(args.chunk_size), encryption, source, args.key_file, args.packs)
    where = f", key in {args.key_file}" if args.key_file else ""
    _emit(
        args,
        {
            "path": repo.location,
            "id": repo.config.id,
            "chunk_size": repo.config.chunk_size,
            "encryption": repo.config.encryption_name,
            "packs": repo.packed,
        },
        f"created repository {repo.location} (chunk size {repo.config.chunk_size // 1024} KiB, "
        f"encryption {repo.config.encryption_name}{where}{', packs' if repo.packed else ''})",
    )
    return 0


def _gather_sources(args: argparse.Namespace) -> tuple[list[DiskSource], str | None, dict]:
    vmx_path: Path | None = args.vmx
    disks: list[str] = list(args.disks)
    if len(disks) == 1 and Path(disks[0]).is_dir():
        vmx_path = find_vmx(Path(disks[0]))
        disks = []
    vmx_text = None
    if vmx_path is not None:
        try:
            vmx_text = vmx_path.read_text(errors="replace")
        except OSError as exc:
            raise SourceError(f"cannot read {vmx_path}: {exc.strerror}") from None
    sources: list[DiskSource] = []
    if disks:
        names = iter(args.name)
        for d in disks:
            sources.append(open_source(d, next(names, None) if d == "-" else None))
    elif vmx_text is not None:
        entries = parse_vmx_disks(vmx_text)
        if not entries:
            raise SourceError(f"{vmx_path} names no disks")
        for entry in entries:
            src = open_source(resolve_disk(vmx_path, entry.filename), name=Path(entry.filename).name)
            sources.append(src)
    else:
        raise UsageError("name at least one DISK, or a VM folder, or --vmx")
    info = {"vmx": str(vmx_path) if vmx_path else None, "disks": [str(s.path) if s.path else "stdin" for s in sources]}
    return sources, vmx_text, info


def cmd_backup(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, key_source(args))
    sources, vmx_text, info = _gather_sources(args)
    try:
        with byte_progress(not args.json) as update:
            point = backup_vm(repo, args.vm, sources, vmx_text, info, progress=update)
    finally:
        for s in sources:
            s.close()
    st = point.stats
    text = (
        f"created restore point {point.ref}: {len(point.disks)} disk(s), read {_mb(st['bytes_read'])}, "
        f"new {_mb(st['bytes_new'])} stored as {_mb(st['bytes_stored'])}, "
        f"dedup {st['dedup_ratio'] or '-'}x, compression {st['compression_ratio'] or '-'}x, "
        f"{st['throughput_mb_s']} MB/s in {st['seconds']} s"
    )
    _emit(args, point.summary(), text)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_points(args: argparse.Namespace) -> int:
    """Exit 0 when the listing was read, damaged files included: each is a DAMAGED line in its place (and
    ``"damaged": true`` in JSON), with a warning on stderr; ``verify`` is the command that fails on damage."""
    repo = Repository.open(args.repo, key_source(args))
    listing = repo.list_points(args.vm)
    if listing.damaged:
        print(
            f"bootback: {len(listing.damaged)} restore point file(s) DAMAGED in {repo.location}: they cannot be "
            "published or restored; run 'bootback verify' for details",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(listing.as_json(), indent=2))
        return 0
    # on stderr, like the damage warning: scripts read stdout's one line per point
    layout = ", pack objects" if repo.packed else ""
    print(f"repository {repo.location}: encryption {repo.config.encryption_name}{layout}", file=sys.stderr)
    if not listing.points and not listing.damaged:
        print("no restore points")
    for p in listing.entries():
        if isinstance(p, DamagedPoint):
            print(f"{p.ref}  DAMAGED  {p.error}")
            continue
        disks = ", ".join(f"{d.name} ({d.size / GiB:.2f} GiB)" for d in p.disks)
        print(f"{p.ref}  {p.time:%Y-%m-%d %H:%M:%S} UTC  {disks}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, key_source(args))
    # a restore reads each chunk once: keep only the read-ahead window
    ahead = read_ahead_chunks(repo.store, repo.config.chunk_size)
    repo.chunk_cache = ChunkCache(streaming_cache_bytes(ahead, repo.config.chunk_size))
    point = repo.resolve(args.point)
    if args.disk is None:
        if len(point.disks) != 1:
            names = ", ".join(d.name for d in point.disks)
            raise UsageError(f"{point.ref} has {len(point.disks)} disks ({names}); choose one with --disk")
        args.disk = point.disks[0].name
    reader = repo.open_disk(point, args.disk)
    to_stdout = args.output == "-"
    try:
        with restore_output(args.output) as (out, sparse), byte_progress(not args.json and not to_stdout) as update:
            _copy_disk(reader, out, sparse, lambda done: update(args.disk, done, reader.size))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left writing {args.output}") from exc
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    if not to_stdout:
        _emit(
            args,
            {"point": point.ref, "disk": args.disk, "size": reader.size, "output": args.output},
            f"restored {point.ref} disk {args.disk} ({reader.size} bytes) to {args.output}",
        )
    return 0


def _copy_disk(reader: DiskReader, out: BinaryIO, sparse: bool, progress: Callable[[int], None]) -> None:
    for index in range(len(reader.disk.chunks)):
        base = index * reader.chunk_size
        length = min(reader.chunk_size, reader.size - base)
        if sparse and reader.is_zero(index):
            out.seek(length, os.SEEK_CUR)  # keep a regular output file sparse
        else:
            out.write(reader.read(base, length))
        progress(base + length)
    if sparse:
        out.truncate(reader.size)


@contextlib.contextmanager
def restore_output(target: str) -> Iterator[tuple[BinaryIO, bool]]:
    """Where a restore writes: (stream, whether it may skip zeros by seeking).

    A regular file is written beside the target under a temporary name and renamed over it only when whole, so
    a failed restore leaves no partial file (and keeps any older one). Anything else (stdout, a pipe, a device
    such as /dev/null or a disk) is written in order, zeros included: seeking would keep a device's old bytes."""
    if target == "-":
        yield sys.stdout.buffer, False
        sys.stdout.buffer.flush()
        return
    path = Path(target)
    if path.exists() and not path.is_file():
        with open(path, "wb") as out:  # a device or FIFO: no truncate, no rename
            yield out, False
            out.flush()
            if stat.S_ISBLK(os.fstat(out.fileno()).st_mode):
                os.fsync(out.fileno())
        return
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)  # 0600, O_EXCL
    tmp = Path(name)
    try:
        with _SyncBehindFile(fd, "wb") as out:
            yield out, True  # type: ignore[misc]
            out.finish()
        os.replace(tmp, path)  # streamed, so not write_atomic; its directory step is the same helper's
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a partial file after a failure


SYNC_BEHIND = 64 << 20  # bytes written between two background flushes of a restore's output file


class _SyncBehindFile(io.FileIO):
    """A restore's output file, flushed to disk in the background while the restore runs: the kernel starts
    writing dirty pages only past a tenth of memory (GBs here), so a single fsync at the end would write the
    whole disk image while nothing else happens (~2 s per GiB on this machine, a fifth of an S3 restore). One
    ``fdatasync`` at a time runs in a helper thread (it releases the GIL) every ``SYNC_BEHIND`` bytes;
    ``finish`` waits for it and fsyncs the rest, so the file is durable before it is renamed into place."""

    def __init__(self, fd: int, mode: str) -> None:
        super().__init__(fd, mode)
        self._since = 0
        self._dropped = 0  # bytes before this offset were synced and dropped from the page cache
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sync-behind")
        self._syncing: Future | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        while view:  # a raw write may be short
            view = view[super().write(view) :]
        self._since += len(data)
        if self._since >= SYNC_BEHIND and (self._syncing is None or self._syncing.done()):
            if self._syncing is not None:
                self._syncing.result()  # a failed flush (EIO, ENOSPC) stops the restore now
            self._since = 0
            self._syncing = self._pool.submit(self._sync_and_drop, self.tell())
        return len(data)

    def _sync_and_drop(self, end: int) -> None:
        os.fdatasync(self.fileno())
        # What is on disk now leaves the page cache at once, so a restore of a big disk neither evicts everything
        # else cached nor makes each new page a reclaim (measured: ~1 s less per 512 MiB on this machine).
        os.posix_fadvise(self.fileno(), self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
        self._dropped = end

    def finish(self) -> None:
        """Everything written durable (the background flush's error, if any, raised here)."""
        if self._syncing is not None:
            self._syncing.result()
        os.fsync(self.fileno())

    def close(self) -> None:
        pool = getattr(self, "_pool", None)  # absent when __init__ failed
        if pool is not None:
            pool.shutdown(wait=True)  # never close the descriptor under a running fdatasync
        super().close()


def cmd_verify(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, key_source(args))
    with byte_progress(not args.json) as update:
        report = verify(repo, progress=lambda done, total: update("chunks", done, total))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"checked {report.chunks_checked} chunks")
        for ref, bad in sorted(report.damaged_points.items()):
            print(f"DAMAGED {ref}: {len(bad)} bad chunk(s), e.g. {bad[0]}")
        for ref, err in sorted(report.unreadable_points.items()):
            print(f"DAMAGED MANIFEST {ref}: {err}")
        for key, err in sorted(report.damaged_indexes.items()):
            print(f"DAMAGED INDEX {key}: {err}")
        print("repository OK" if report.ok else "repository DAMAGED")
    return 0 if report.ok else 1


def cmd_prune(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, key_source(args))
    report = prune(repo, args.vm, args.keep, dry_run=args.dry_run)
    text = (
        f"{'would delete' if args.dry_run else 'deleted'} {len(report.deleted_points)} restore point(s), "
        f"kept {len(report.kept_points)}; freed {report.deleted_chunks} chunks ({_mb(report.freed_bytes)})"
    )
    _emit(args, report.as_dict(), text)
    return 0

"""Restore points: what a backup of one VM at one moment holds (its disks' chunk lists, its .vmx, stats).

A point is stored in one file, ``points/<vm>/<id>.point`` (``pointfile`` reads and writes it): a small *summary*
(every fact but the chunk lists) and the *chunk lists*, each checksummed. Listing reads summaries only; chunk
lists are read when a disk is opened. Here: the objects, their JSON and the rules every loaded point must
pass (``check_point``, ``check_chunks``), so a damaged or forged file is refused, never read as other facts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.errors import IntegrityError, UnsupportedFormatError, UsageError

MANIFEST_FORMAT = 2  # the JSON "format" of a summary; format-1 manifests (whole, unsealed) are still read
# \Z, not $: "$" also matches before a final newline
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
POINT_ID_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{6}Z\Z")
CHUNK_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")
_HEX_RUN = re.compile(r"[0-9a-f]*")
MAX_DISKS = 256
MAX_DISK_SIZE = 1 << 48  # 256 TiB: above every hypervisor's disk limit (VMDK 62 TB, VHDX 64 TB)
MAX_NAME = 255
MAX_SHORT_TEXT = 64  # source_format, adapter, controller
MAX_NESTING = 8  # source and stats are a level or two deep; deeper would break every JSON encoder downstream
CHUNK_ENTRY_MAX = 67  # longest JSON form of one chunk list entry: '"<64 hex>",'


def point_ref(vm: str, point_id: str) -> str:
    """``vm@id`` as read from a file's path; names that are not well formed (a stray file) are quoted, so they
    print harmlessly."""
    return f"{vm if VM_NAME_RE.match(vm) else repr(vm)}@{point_id if POINT_ID_RE.match(point_id) else repr(point_id)}"


def check_vm_name(name: str) -> str:
    if not VM_NAME_RE.match(name):
        raise UsageError(
            f"invalid VM name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with a symbol)"
        )
    return name


@dataclass
class DiskEntry:
    """One disk of a restore point. ``chunks[i]`` is the hex id of chunk i, or None for an all-zero chunk;
    ``chunks`` itself is None in a point loaded as a summary (``Repository.restore_points``)."""

    name: str
    size: int
    chunk_size: int
    chunks: list[str | None] | None
    source_format: str = "raw"
    adapter: str | None = None  # e.g. "lsilogic", "ide", "pvscsi" when the source said so
    geometry: dict[str, int] | None = None  # {"cylinders":..,"heads":..,"sectors":..} from a source VMDK
    controller: str | None = None  # the .vmx device key naming this disk, e.g. "scsi0:0"

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def facts(self) -> dict[str, Any]:
        """Everything but the chunk list (the summary's JSON form)."""
        return {
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "source_format": self.source_format,
            "adapter": self.adapter,
            "geometry": self.geometry,
            "controller": self.controller,
        }


@dataclass
class RestorePoint:
    vm: str
    id: str
    time: datetime
    disks: list[DiskEntry]
    vmx: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.vm}@{self.id}"

    @property
    def has_chunks(self) -> bool:
        """Whether the chunk lists are loaded (False for a summary from ``Repository.restore_points``)."""
        return all(d.chunks is not None for d in self.disks)

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        from appliance.errors import RestorePointNotFoundError

        have = ", ".join(d.name for d in self.disks) or "none"
        raise RestorePointNotFoundError(f"restore point {self.ref} has no disk {name!r} (disks: {have})")

    def summary(self) -> dict[str, Any]:
        """The JSON shape shown to users (without chunk lists)."""
        return {
            "vm": self.vm,
            "id": self.id,
            "time": self.time.isoformat(),
            "disks": [
                {"name": d.name, "size": d.size, "format": d.source_format, "adapter": d.adapter} for d in self.disks
            ],
            "has_vmx": self.vmx is not None,
            "source": self.source,
            "stats": self.stats,
        }

    # --- stored JSON ----------------------------------------------------------------------------------
    def summary_json(self, chunk_lists_len: int, chunk_lists_sha256: str) -> bytes:
        """The summary section; it names the chunk-list section's length and checksum, binding the two."""
        doc = {
            "format": MANIFEST_FORMAT,
            "vm": self.vm,
            "id": self.id,
            "time": self.time.isoformat(),
            "vmx": self.vmx,
            "source": self.source,
            "stats": self.stats,
            "disks": [d.facts() for d in self.disks],
            "chunk_lists": {"length": chunk_lists_len, "sha256": chunk_lists_sha256},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def chunk_lists_json(self) -> bytes:
        return json.dumps([d.chunks for d in self.disks], separators=(",", ":")).encode()


@dataclass(frozen=True)
class DamagedPoint:
    """A point file that cannot be read: only what its path says (VM folder, file name) and why. Listings show
    it beside the good points, so one damaged file hides nothing else and is itself never shown with facts."""

    vm: str
    id: str
    error: str

    @property
    def ref(self) -> str:
        return point_ref(self.vm, self.id)

    def summary(self) -> dict[str, Any]:
        return {"vm": self.vm, "id": self.id, "damaged": True, "error": self.error}


@dataclass(frozen=True)
class ChunkListsRef:
    """What a summary says about its point's chunk-list section."""

    length: int
    sha256: bytes


def parse_summary(raw: bytes, name: str) -> tuple[RestorePoint, ChunkListsRef]:
    """A format-2 summary -> (point without chunk lists, what the chunk-list section must be). Shape only:
    ``check_point`` checks the facts."""
    doc = _json_object(raw, name)
    _check_format(doc, name, MANIFEST_FORMAT)
    ref = _get(doc, "chunk_lists", dict, name)
    length = _get(ref, "length", int, name)
    digest = _get(ref, "sha256", str, name)
    if length < 0 or not CHUNK_ID_RE.match(digest):
        raise IntegrityError(f"{name}: malformed chunk_lists reference {ref!r}")
    return _point(doc, name, [None] * len(_get(doc, "disks", list, name))), ChunkListsRef(length, bytes.fromhex(digest))


def parse_chunk_lists(raw: bytes, point: RestorePoint, name: str) -> None:
    """Attach the chunk lists of a format-2 point (``check_chunks`` checks them)."""
    try:
        lists = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise IntegrityError(f"{name}: malformed chunk lists: {exc}") from exc
    if not isinstance(lists, list) or len(lists) != len(point.disks):
        got = len(lists) if isinstance(lists, list) else type(lists).__name__
        raise IntegrityError(f"{name}: {got} chunk lists for {len(point.disks)} disks")
    for disk, chunks in zip(point.disks, lists, strict=True):
        disk.chunks = chunks


def parse_v1(raw: bytes, name: str) -> RestorePoint:
    """A whole format-1 manifest (chunk lists inside each disk)."""
    doc = _json_object(raw, name)
    _check_format(doc, name, 1)
    disks = _get(doc, "disks", list, name)
    chunks = [_get(d, "chunks", list, name) if isinstance(d, dict) else None for d in disks]
    return _point(doc, name, chunks)


def _json_object(raw: bytes, name: str) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise IntegrityError(f"{name}: malformed manifest: {exc}") from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"{name}: malformed manifest: a {type(doc).__name__}, expected an object")
    return doc


def _check_format(doc: dict, name: str, expected: int) -> None:
    fmt = _get(doc, "format", int, name)
    if fmt > MANIFEST_FORMAT:
        raise UnsupportedFormatError(
            f"{name}: manifest format {fmt} is newer than this bootback supports ({MANIFEST_FORMAT})"
        )
    if fmt != expected:
        raise IntegrityError(f"{name}: manifest format {fmt} where format {expected} is expected")


def _point(doc: dict, name: str, chunks: list) -> RestorePoint:
    disks = []
    for d, ch in zip(_get(doc, "disks", list, name), chunks, strict=True):
        if not isinstance(d, dict):
            raise IntegrityError(f"{name}: a disk entry is a {type(d).__name__}, expected an object")
        disks.append(
            DiskEntry(
                name=_get(d, "name", str, name),
                size=_get(d, "size", int, name),
                chunk_size=_get(d, "chunk_size", int, name),
                chunks=ch,
                source_format=_get(d, "source_format", str, name, "raw"),
                adapter=_get(d, "adapter", (str, type(None)), name, None),
                geometry=_get(d, "geometry", (dict, type(None)), name, None),
                controller=_get(d, "controller", (str, type(None)), name, None),
            )
        )
    time_text = _get(doc, "time", str, name)
    try:
        when = datetime.fromisoformat(time_text)
    except ValueError:
        raise IntegrityError(f"{name}: time {time_text!r} is not an ISO 8601 time") from None
    return RestorePoint(
        vm=_get(doc, "vm", str, name),
        id=_get(doc, "id", str, name),
        time=when,
        disks=disks,
        vmx=_get(doc, "vmx", (str, type(None)), name, None),
        source=_get(doc, "source", dict, name, {}),
        stats=_get(doc, "stats", dict, name, {}),
    )


_ABSENT = object()


def _get(doc: dict, key: str, types: type | tuple[type, ...], name: str, default: Any = _ABSENT) -> Any:  # noqa: ANN401
    """``doc[key]`` if it has one of ``types``; ``default`` when absent (fields older manifests lack)."""
    if key not in doc:
        if default is not _ABSENT:
            return default
        raise IntegrityError(f"{name}: malformed manifest: no {key!r}")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int to Python, never to us
        raise IntegrityError(f"{name}: {key} is {value!r}, expected {_type_names(types)}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


# --- the rules a loaded point must pass (one place for both formats) --------------------------------------
def check_point(point: RestorePoint, chunk_size: int, vm: str, point_id: str, name: str) -> RestorePoint:
    """Refuse a point whose facts contradict its file name, the repository or each other."""

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{name}: {what}")

    if point.vm != vm or not VM_NAME_RE.match(point.vm):
        raise bad(f"names VM {point.vm!r}, but is stored under {vm!r}")
    if point.id != point_id or not POINT_ID_RE.match(point.id):
        raise bad(f"names point id {point.id!r}, but is stored as {point_id!r}")
    if point.time.utcoffset() is None or new_point_id(point.time) != point.id:
        raise bad(f"time {point.time.isoformat()} does not match its id {point.id}")
    for key, value in (("source", point.source), ("stats", point.stats)):
        if _depth(value) > MAX_NESTING:
            raise bad(f"{key} is nested more than {MAX_NESTING} levels deep")
    if not 1 <= len(point.disks) <= MAX_DISKS:
        raise bad(f"{len(point.disks)} disks (1 to {MAX_DISKS} allowed)")
    seen: set[str] = set()
    for d in point.disks:
        if not 0 < len(d.name) <= MAX_NAME or d.name in (".", "..") or "/" in d.name or "\0" in d.name:
            raise bad(f"invalid disk name {d.name!r}")
        if d.name in seen:
            raise bad(f"two disks are named {d.name!r}")
        seen.add(d.name)
        if d.chunk_size != chunk_size:
            raise bad(f"disk {d.name}: chunk size {d.chunk_size}, but the repository's is {chunk_size}")
        if not 0 <= d.size <= MAX_DISK_SIZE:
            raise bad(f"disk {d.name}: size {d.size} out of range (0 to {MAX_DISK_SIZE})")
        for key, text in (("source_format", d.source_format), ("adapter", d.adapter), ("controller", d.controller)):
            if text is not None and len(text) > MAX_SHORT_TEXT:
                raise bad(f"disk {d.name}: {key} longer than {MAX_SHORT_TEXT} characters")
        if d.geometry is not None and not all(
            isinstance(k, str) and type(v) is int and 0 <= v < 1 << 32 for k, v in d.geometry.items()
        ):
            raise bad(f"disk {d.name}: malformed geometry {d.geometry!r}")
        if d.chunks is not None:
            check_chunks(d, name)
    return point


def _depth(value: object, limit: int = MAX_NESTING + 1) -> int:
    """How deep ``value`` nests lists and dicts, counted no further than ``limit``."""
    if limit <= 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def check_chunks(disk: DiskEntry, name: str) -> None:
    """A chunk list must cover the disk exactly, with well-formed ids (a reader indexes it by offset)."""
    chunks = disk.chunks
    if not isinstance(chunks, list) or len(chunks) != disk.chunk_count:
        got = len(chunks) if isinstance(chunks, list) else type(chunks).__name__
        raise IntegrityError(
            f"{name}: disk {disk.name} of {disk.size} bytes needs {disk.chunk_count} chunks of "
            f"{disk.chunk_size} bytes, the manifest lists {got}"
        )
    ids = [c for c in chunks if c is not None]
    try:  # millions of ids: checked in bulk (C loops), the slow loop below only names the culprit
        if set(map(len, ids)) <= {64} and _HEX_RUN.fullmatch("".join(ids)):
            return
    except TypeError:
        pass
    for i, cid in enumerate(chunks):
        if cid is not None and not (isinstance(cid, str) and CHUNK_ID_RE.match(cid)):
            raise IntegrityError(f"{name}: disk {disk.name}: chunk {i} has a malformed id {cid!r}")
    raise IntegrityError(f"{name}: disk {disk.name}: malformed chunk ids")  # not reached: the loop names one


def chunk_lists_bound(disks: list[DiskEntry]) -> int:
    """The longest chunk-list JSON these disks can have: checked before the section is decompressed."""
    return sum(d.chunk_count * CHUNK_ENTRY_MAX + 2 for d in disks) + 2


def new_point_id(now: datetime | None = None) -> str:
    """Sortable, readable ids: 2026-11-24T23-50-01.123456Z (no ':' so they are safe in file and URL names)."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H-%M-%S.%fZ")

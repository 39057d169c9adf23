"""Restore points: what a backup of one VM at one moment holds (its disks' chunk lists, its .vmx, stats).

A manifest is one framed, zstd-compressed JSON document, ``points/<vm>/<id>.point``. It is written last,
after every chunk it references is durable, and renamed into place: a restore point is visible whole or not
at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.errors import IntegrityError, UnsupportedFormatError

MANIFEST_FORMAT = 1
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_vm_name(name: str) -> str:
    if not VM_NAME_RE.match(name):
        from appliance.errors import UsageError

        raise UsageError(
            f"invalid VM name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with a symbol)"
        )
    return name


@dataclass
class DiskEntry:
    """One disk of a restore point. ``chunks[i]`` is the hex id of chunk i, or None for an all-zero chunk."""

    name: str
    size: int
    chunk_size: int
    chunks: list[str | None]
    source_format: str = "raw"
    adapter: str | None = None  # e.g. "lsilogic", "ide", "pvscsi" when the source said so
    geometry: dict[str, int] | None = None  # {"cylinders":..,"heads":..,"sectors":..} from a source VMDK
    controller: str | None = None  # the .vmx device key naming this disk, e.g. "scsi0:0"


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

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "vm": self.vm,
            "id": self.id,
            "time": self.time.isoformat(),
            "vmx": self.vmx,
            "source": self.source,
            "stats": self.stats,
            "disks": [asdict(d) for d in self.disks],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, name: str) -> RestorePoint:
        try:
            doc = json.loads(raw)
            fmt = doc["format"]
            if fmt > MANIFEST_FORMAT:
                raise UnsupportedFormatError(
                    f"{name}: manifest format {fmt} is newer than this bootback supports ({MANIFEST_FORMAT})"
                )
            return cls(
                vm=doc["vm"],
                id=doc["id"],
                time=datetime.fromisoformat(doc["time"]),
                vmx=doc.get("vmx"),
                source=doc.get("source") or {},
                stats=doc.get("stats") or {},
                disks=[DiskEntry(**d) for d in doc["disks"]],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{name}: malformed manifest: {exc}") from exc


def new_point_id(now: datetime | None = None) -> str:
    """Sortable, readable ids: 2026-11-24T23-50-01.123456Z (no ':' so they are safe in file and URL names)."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H-%M-%S.%fZ")

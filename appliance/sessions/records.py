"""Session records: what a published session is, persisted as one JSON file each in the state directory."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODES = ("instant", "sandbox")


@dataclass
class SessionRecord:
    id: str
    vm: str
    point: str
    repo: str
    mode: str  # "instant" (persistent cache, migratable) or "sandbox" (cache discarded at stop)
    slot: int
    folder: str
    cache_dir: str
    created: str
    disks: list[dict] = field(default_factory=list)  # [{"key", "descriptor", "extent", "size"}]
    migrated_to: str | None = None

    def save(self, sessions_dir: Path) -> None:
        sessions_dir.mkdir(parents=True, exist_ok=True)
        tmp = sessions_dir / f".{self.id}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sessions_dir / f"{self.id}.json")
        fd = os.open(sessions_dir, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    @classmethod
    def load(cls, path: Path) -> SessionRecord:
        return cls(**json.loads(path.read_text()))

    def delete(self, sessions_dir: Path) -> None:
        (sessions_dir / f"{self.id}.json").unlink(missing_ok=True)

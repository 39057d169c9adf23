"""Session records: what a published session is, persisted as one JSON file each in the state directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.atomicfile import write_atomic

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
        sessions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(sessions_dir / f"{self.id}.json", json.dumps(asdict(self), indent=2), 0o600)

    @classmethod
    def load(cls, path: Path) -> SessionRecord:
        return cls(**json.loads(path.read_text()))

    def delete(self, sessions_dir: Path) -> None:
        (sessions_dir / f"{self.id}.json").unlink(missing_ok=True)

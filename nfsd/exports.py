"""Exports: what is served under which path, to which client networks, read-write or read-only."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from nfsd.handles import HandleCodec
from nfsd.vfs import Backend, Cred, NFSError, ObjectId, Status

NOBODY = 65534


@dataclass
class Export:
    path: str  # what clients mount, e.g. "/bootback"
    backend: Backend
    clients: list[str] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])  # CIDR networks allowed
    read_only: bool = False
    root_squash: bool = False  # ESXi needs root unsquashed, so off by default
    require_privileged_port: bool = False
    id: int = 0

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"export path {self.path!r} must be absolute")
        self.path = "/" + self.path.strip("/")
        self._networks = [ipaddress.ip_network(c, strict=False) for c in self.clients]
        self._allowed: dict[str, bool] = {}

    def allows(self, address: str) -> bool:
        # Asked on every call: remember the answer per address (few distinct hypervisors talk to us).
        known = self._allowed.get(address)
        if known is None:
            known = self._check(address)
            if len(self._allowed) > 4096:
                self._allowed.clear()
            self._allowed[address] = known
        return known

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks if net.version == ip.version)

    def effective(self, cred: Cred) -> Cred:
        if self.root_squash and cred.uid == 0:
            return Cred(NOBODY, NOBODY, (), cred.machine, cred.address)
        return cred


class ExportTable:
    """Exports by id and path, and the handle codec that names their objects on the wire."""

    def __init__(self, codec: HandleCodec) -> None:
        self.codec = codec
        self._by_id: dict[int, Export] = {}

    def add(self, export: Export) -> Export:
        if any(e.path == export.path for e in self._by_id.values()):
            raise ValueError(f"export path {export.path} is already exported")
        export.id = export.id or (max(self._by_id, default=0) + 1)
        if export.id in self._by_id or not 0 < export.id < 256:
            raise ValueError(f"export id {export.id} is taken or out of range 1..255")
        self._by_id[export.id] = export
        return export

    def remove(self, path: str) -> None:
        for eid, e in list(self._by_id.items()):
            if e.path == "/" + path.strip("/"):
                del self._by_id[eid]

    def all(self) -> list[Export]:
        return list(self._by_id.values())

    def by_path(self, path: str) -> Export | None:
        norm = "/" + path.strip("/")
        for e in self._by_id.values():
            if e.path == norm:
                return e
        return None

    def containing(self, path: str) -> tuple[Export | None, list[str]]:
        """The export whose path is the longest prefix of ``path``, and the components below it."""
        parts = [p for p in path.split("/") if p]
        for n in range(len(parts), -1, -1):
            export = self.by_path("/" + "/".join(parts[:n]))
            if export is not None:
                rest = parts[n:]
                if any(p in (".", "..") for p in rest):
                    return None, []
                return export, rest
        return None, []

    def handle(self, export: Export, obj: ObjectId) -> bytes:
        return self.codec.encode(export.id, obj)

    def resolve(self, handle: bytes | memoryview) -> tuple[Export, ObjectId]:
        export_id, obj = self.codec.decode(handle)
        export = self._by_id.get(export_id)
        if export is None:
            raise NFSError(Status.STALE, f"export {export_id} is gone")
        return export, obj

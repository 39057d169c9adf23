"""The backup repository: a dumb content-addressed chunk store with restore-point manifests on top.

Its names load on first use (PEP 562): a command that only needs ``appliance.repo.backends`` or the control
socket does not pay for the reader, the manifest and ``cryptography`` at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.repo.manifest import DiskEntry, RestorePoint
    from appliance.repo.reader import ChunkCache, DiskReader
    from appliance.repo.repository import Repository

_WHERE = {
    "ChunkCache": "appliance.repo.reader",
    "DiskEntry": "appliance.repo.manifest",
    "DiskReader": "appliance.repo.reader",
    "Repository": "appliance.repo.repository",
    "RestorePoint": "appliance.repo.manifest",
}
__all__ = ["ChunkCache", "DiskEntry", "DiskReader", "Repository", "RestorePoint"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value

"""The backup repository: a dumb content-addressed chunk store with restore-point manifests on top."""

from appliance.repo.manifest import DiskEntry, RestorePoint
from appliance.repo.reader import ChunkCache, DiskReader
from appliance.repo.repository import Repository

__all__ = ["ChunkCache", "DiskEntry", "DiskReader", "Repository", "RestorePoint"]

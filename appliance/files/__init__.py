"""File-level recovery: the partitions and filesystems inside a restore point's disk, browsed and read
straight from the repository (no restore, no mount, nothing written)."""

from appliance.files.browser import Entry, FileBrowser, Volume, browse

__all__ = ["Entry", "FileBrowser", "Volume", "browse"]

"""A read-only FUSE file system over one directory of a backed-up disk, served by the file-level recovery layer.

It is the lower layer of the copy-on-write view (``cowview``): the kernel's overlayfs puts a private writable
directory on top, so a database server can run on it while only the files it reads are fetched from the
repository, and only the files it writes are copied up. Nothing here writes: every write-like call is refused
by FUSE itself (the mount is ``ro``).

It runs in its own process (``python -m appliance.items.fuseview``) and single-threaded, because dissect's
parsers keep file positions and are not thread-safe; the parent unmounts it with ``fusermount -u``.
"""

from __future__ import annotations

import argparse
import errno
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fuse import FUSE, FuseOSError, Operations  # fusepy

from appliance.errors import BootbackError, FileNotFoundInBackupError
from appliance.files import FileBrowser, browse
from appliance.files.filesystems import Entry
from appliance.items.viewtree import link_target, nodes
from appliance.repo import Repository
from appliance.repo.backends import repository_arg

# The modes a database server insists on (PostgreSQL refuses a data directory other than 0700/0750); the
# file browser has no owners or modes to offer for every file system it reads, so the view sets them.
DIR_MODE = stat.S_IFDIR | 0o700
FILE_MODE = stat.S_IFREG | 0o600
LINK_MODE = stat.S_IFLNK | 0o777


class BackupView(Operations):
    """The tree below ``root``, indexed once at start: one scan per directory (dissect's lookup by path scans
    each directory on the way, which made every FUSE lookup and open cost a scan of its whole directory)."""

    def __init__(self, browser: FileBrowser, root: str, uid: int, gid: int) -> None:
        self.browser = browser
        self.root = root.rstrip("/")
        self.uid, self.gid = uid, gid
        self._open: dict[int, object] = {}
        self._next_fh = 1
        top = browser.stat(root)
        if top.kind != "directory":
            raise FileNotFoundInBackupError(f"not a directory: {root}")
        self._entries: dict[str, tuple[Entry, Callable[[], BinaryIO] | None]] = {"/": (top, None)}
        self._children: dict[str, list[str]] = {"/": []}
        self._sources: dict[str, str] = {"/": self.root}  # each path's place in the backup (grafts: elsewhere)
        for node in nodes(browser, root):  # symlinks leaving the view are grafted or left out: see viewtree
            path = "/" + node.rel
            parent, _, name = path.rpartition("/")
            self._children.setdefault(parent or "/", []).append(name)
            self._entries[path] = (node.entry, node.opener)
            self._sources[path] = node.source
            if node.entry.kind == "directory":
                self._children.setdefault(path, [])
        self._attrs: dict[str, dict] = {}

    def _entry(self, path: str) -> tuple[Entry, Callable[[], BinaryIO] | None]:
        found = self._entries.get(path)
        if found is None:
            raise FuseOSError(errno.ENOENT)
        return found

    def getattr(self, path: str, fh: int | None = None) -> dict:
        if path in self._attrs:
            return self._attrs[path]
        entry, _ = self._entry(path)
        mode = {"directory": DIR_MODE, "file": FILE_MODE, "symlink": LINK_MODE}[entry.kind]
        when = entry.mtime.timestamp() if entry.mtime else time.time()
        size = entry.size if entry.kind == "file" else 0
        if entry.kind == "symlink":
            size = len(self.readlink(path))
        attrs = {
            "st_mode": mode,
            "st_nlink": 2 if entry.kind == "directory" else 1,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_size": size,
            "st_mtime": when,
            "st_atime": when,
            "st_ctime": when,
        }
        self._attrs[path] = attrs
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        if path not in self._children:
            raise FuseOSError(errno.ENOTDIR if path in self._entries else errno.ENOENT)
        return [".", "..", *self._children[path]]

    def readlink(self, path: str) -> str:
        self._entry(path)
        target = link_target(self.browser, self._sources[path])
        if target is None:
            raise FuseOSError(errno.EINVAL)
        return target

    def open(self, path: str, flags: int) -> int:
        entry, opener = self._entry(path)
        if opener is None:
            raise FuseOSError(errno.EISDIR if entry.kind == "directory" else errno.EINVAL)
        try:
            handle = opener()
        except BootbackError:
            raise FuseOSError(errno.EIO) from None
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._open[fh] = handle
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._open.get(fh)
        if handle is None:
            raise FuseOSError(errno.EBADF)
        try:
            handle.seek(offset)
            return handle.read(size)
        except BootbackError:  # a damaged chunk: an I/O error for the reader, never wrong bytes
            raise FuseOSError(errno.EIO) from None

    def release(self, path: str, fh: int) -> int:
        self._open.pop(fh, None)
        return 0

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0, "f_namemax": 255}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.items.fuseview")
    p.add_argument("repo")
    p.add_argument("point")
    p.add_argument("disk")
    p.add_argument("root", help="browser path of the directory to show, e.g. /p1/var/lib/postgresql/15/main")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    args = p.parse_args(argv)
    repo = Repository.open(repository_arg(args.repo))
    browser = browse(repo, repo.resolve(args.point), args.disk)
    view = BackupView(browser, args.root, args.uid, args.gid)
    # The backup never changes: let the kernel keep pages, attributes and lookups (misses too) for good.
    FUSE(
        view,
        str(args.mountpoint),
        foreground=True,
        nothreads=True,
        ro=True,
        allow_other=True,
        fsname="bootback",
        kernel_cache=True,
        entry_timeout=86400,
        attr_timeout=86400,
        negative_timeout=86400,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BootbackError as exc:
        print(f"bootback: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

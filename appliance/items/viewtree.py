"""What a private view of an application's directory holds: the tree below it in the backup, plus directories
its symlinks lead to elsewhere on the same file system, grafted in where the links are.

A PostgreSQL cluster made with ``initdb --waldir`` has ``pg_wal -> /srv/wal``, and each tablespace is a link
``pg_tblspc/OID -> /data/ts``; a mailbox may be a link too. On the appliance such a link would lead to the
appliance's own files (and the server would write there), so a link is never shown as it is when it leaves the
view. Instead, its target is resolved the way the VM's kernel would (an absolute target from the root of the
link's own file system, '..' never above that root) and, when that is a directory of the backup that neither
contains nor lies inside the view, its tree is shown in place of the link. One level only: links inside a
grafted tree are kept only when they stay inside it, so a loop of links cannot make the view grow.
Both views (FUSE and the copy) are built from this one list.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from appliance.errors import BootbackError
from appliance.files import FileBrowser
from appliance.files.filesystems import Entry

KINDS = ("file", "directory", "symlink")  # FIFOs, devices, sockets: nothing an application's data needs


@dataclass(frozen=True)
class Node:
    rel: str  # path inside the view, no leading slash
    entry: Entry
    opener: Callable[[], BinaryIO] | None
    source: str  # its browser path in the backup (/VOLUME/...)


def link_target(browser: FileBrowser, path: str) -> str | None:
    """The target of the symlink at browser path ``path``, or None when it cannot be read."""
    vol, inner = browser.split(path)
    try:
        return browser.filesystem(vol).fs.get(inner).link  # ext and XFS inodes (dissect) carry the target
    except Exception:  # noqa: BLE001 - NTFS/FAT reparse points are not followed
        return None


def _stays_inside(rel_parent: str, target: str) -> bool:
    joined = posixpath.normpath(posixpath.join(rel_parent, target))
    return not target.startswith("/") and joined != ".." and not joined.startswith("../")


def nodes(browser: FileBrowser, root: str) -> Iterator[Node]:
    """Every node of the view of the browser directory ``root``, parents before children."""
    root = root.rstrip("/")
    vol, root_inner = browser.split(root)
    links: list[tuple[str, str]] = []
    for rel, entry, opener in browser.walk(root):
        if entry.kind not in KINDS:
            continue
        if entry.kind == "symlink":
            target = link_target(browser, f"{root}/{rel}")
            if target is None:
                continue
            if not _stays_inside(posixpath.dirname(rel), target):
                links.append((rel, target))
                continue
        yield Node(rel, entry, opener, f"{root}/{rel}")
    for rel, target in links:
        yield from _graft(browser, vol, root_inner, rel, target)


def _graft(browser: FileBrowser, vol: str, root_inner: str, rel: str, target: str) -> Iterator[Node]:
    """The directory the link ``rel`` leads to, as a tree at ``rel``; nothing when it is not a directory of
    the same file system, or is the view itself, inside it, or above it (a loop)."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(f"{root_inner}/{rel}"), target))
    resolved = "/" + resolved.lstrip("/")  # '..' above the root stays at the root, as in the kernel
    if resolved == root_inner or resolved.startswith(root_inner + "/") or root_inner.startswith(resolved + "/"):
        return
    if resolved == "/":
        return
    source = f"/{vol}{resolved}"
    try:
        top = browser.stat(source)
        if top.kind != "directory":
            return
        inside = list(browser.walk(source))
    except BootbackError:
        return  # a dangling link: the application says what it misses
    yield Node(rel, top, None, source)
    for sub, entry, opener in inside:
        if entry.kind not in KINDS:
            continue
        if entry.kind == "symlink":
            sub_target = link_target(browser, f"{source}/{sub}")
            if sub_target is None or not _stays_inside(posixpath.dirname(sub), sub_target):
                continue
        yield Node(f"{rel}/{sub}", entry, opener, f"{source}/{sub}")

"""The one rule for names a client hands the server: a directory entry name (``filename3`` of LOOKUP, CREATE,
MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME, LINK, and each component of a MOUNT ``dirpath``) and symlink data
(``nfspath3``).

XDR leaves both unbounded (``filename3<>``, ``nfspath3<>``): only the record size bounds them, so a long name
is valid XDR and gets NFS3ERR_NAMETOOLONG, not GARBAGE_ARGS. A name is exactly one component: empty, or with
'/' or NUL inside, is NFS3ERR_INVAL. '.' and '..' exist in every directory: LOOKUP resolves them; creating one
is NFS3ERR_EXIST and removing or renaming one NFS3ERR_ACCES (what Linux's knfsd answers).
"""

from __future__ import annotations

from nfsd.vfs import NFSError, Status

NAME_MAX = 255  # bytes of one name, as PATHCONF's name_max says
PATH_MAX = 4096  # bytes of symlink data
DOTS = (".", "..")


def _size(s: str) -> int:
    # Names arrive as bytes and are decoded with surrogateescape (nfsd.xdr), so this is their wire length.
    return len(s.encode("utf-8", "surrogateescape"))


def check_name(name: str, dots: Status | None) -> str:
    """``name`` if it can name one directory entry, else NFSError. ``dots`` is the status for '.' and '..'
    (None: allowed, for LOOKUP)."""
    size = _size(name)
    if size > NAME_MAX:
        raise NFSError(Status.NAMETOOLONG, f"name of {size} bytes, at most {NAME_MAX}: {name[:40]!r}...")
    if not name or "/" in name or "\0" in name:
        raise NFSError(Status.INVAL, f"name {name!r} is not a single path component")
    if dots is not None and name in DOTS:
        raise NFSError(dots, f"name {name!r} always exists and cannot be created, removed or renamed")
    return name


def check_symlink_data(target: str) -> str:
    """``target`` if it can be a symlink's content: any path, but no NUL (the host could not store it)."""
    size = _size(target)
    if size > PATH_MAX:
        raise NFSError(Status.NAMETOOLONG, f"symlink data of {size} bytes, at most {PATH_MAX}: {target[:40]!r}...")
    if not target or "\0" in target:
        raise NFSError(Status.INVAL, f"symlink data {target[:80]!r} is empty or holds a NUL")
    return target

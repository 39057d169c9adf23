"""Paths the daemon writes for a caller (migration outputs, write caches), confined to directories the operator
configured (STYLE.md rule 13).

A caller's path is never resolved by name through the host's filesystem. It must lie, lexically, under one of
the configured roots; the root is opened (the operator chose it, so its own path may hold links), and every
further component is opened relative to the previous descriptor with ``O_DIRECTORY | O_NOFOLLOW`` — a symlink
anywhere below the root is refused, never followed. Missing directories are made 0700; files are made
``O_CREAT | O_EXCL | O_NOFOLLOW`` with mode 0600, so nothing existing is overwritten unless the caller asked,
and then only by renaming a fresh file over the old name (a symlink at that name is replaced, not followed).
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import OutputExistsError, PathNotAllowedError

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def name_component(name: str) -> str:
    """``name`` if it is a single directory entry's name, else PathNotAllowedError naming it."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise PathNotAllowedError(f"{name!r} is not a plain file name")
    return name


def split_beneath(roots: Sequence[Path], path: str | Path, what: str) -> tuple[Path, list[str]]:
    """The configured root ``path`` lies under and the components below it; a relative path is taken under
    the first root. Only lexical: ``..`` components are refused, nothing is looked up."""
    if not roots:
        raise PathNotAllowedError(f"{what} {str(path)!r}: no directory is configured for it on this appliance")
    raw = str(path)
    if "\0" in raw or not raw:
        raise PathNotAllowedError(f"{what} {raw!r} is not a path")
    if ".." in Path(raw).parts:
        raise PathNotAllowedError(f"{what} {raw!r}: '..' is not allowed")
    p = Path(os.path.normpath(raw if os.path.isabs(raw) else os.path.join(roots[0], raw)))
    for root in roots:
        for form in dict.fromkeys((Path(os.path.normpath(root)), Path(os.path.realpath(root)))):
            if p == form or form in p.parents:
                return Path(root), list(p.relative_to(form).parts)
    allowed = ", ".join(map(str, roots))
    raise PathNotAllowedError(f"{what} {raw!r} is outside the allowed directories ({allowed})")


class ConfinedDir:
    """An open directory under a configured root; names below it are single components, never followed."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, roots: Sequence[Path], path: str | Path, what: str, create: bool = True) -> ConfinedDir:
        """The directory at ``path`` (made 0700, with its missing parents, when ``create``)."""
        root, parts = split_beneath(roots, path, what)
        return cls._walk(root, parts, create, what)

    @classmethod
    def open_parent(cls, roots: Sequence[Path], path: str | Path, what: str) -> tuple[ConfinedDir, str | None]:
        """The directory holding ``path`` (made as needed) and the last name; (the root, None) for a root."""
        root, parts = split_beneath(roots, path, what)
        if not parts:
            return cls._walk(root, [], False, what), None
        return cls._walk(root, parts[:-1], True, what), name_component(parts[-1])

    @classmethod
    def _walk(cls, root: Path, parts: list[str], create: bool, what: str) -> ConfinedDir:
        try:
            fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the operator's own path: links there are theirs
        except OSError as exc:
            raise PathNotAllowedError(f"{what}: cannot open the allowed directory {root}: {exc.strerror}") from None
        d = cls(fd, root)
        try:
            for name in parts:
                nxt = d.subdir(name, create, what)
                d.close()
                d = nxt
        except BaseException:
            d.close()
            raise
        return d

    def subdir(self, name: str, create: bool, what: str) -> ConfinedDir:
        name_component(name)
        shown = self.path / name
        if create:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=self.fd)
            except FileExistsError:
                pass
        try:
            return ConfinedDir(os.open(name, _DIR_FLAGS, dir_fd=self.fd), shown)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PathNotAllowedError(
                    f"{what} {str(shown)!r} is a symbolic link or not a directory; links are never followed"
                ) from None
            raise PathNotAllowedError(f"{what} {str(shown)!r}: {exc.strerror}") from None

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name_component(name), dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def exists(self, name: str) -> bool:
        try:
            os.stat(name_component(name), dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def check_new(self, name: str, overwrite: bool, what: str) -> None:
        """Refuse now (before any copying) what ``create`` would refuse later."""
        try:
            st = os.stat(name_component(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise OutputExistsError(f"{what} {str(self.path / name)!r} is an existing directory")
        if not overwrite:
            raise OutputExistsError(f"{what} {str(self.path / name)!r} exists; ask for overwrite to replace it")

    def create(self, name: str, overwrite: bool, what: str) -> NewFile:
        """A new file 0600 at ``name``; with ``overwrite`` it is written under a temporary name and renamed over
        the old one by ``NewFile.commit``."""
        self.check_new(name, overwrite, what)
        temp = f".{name}.bootback-{uuid.uuid4().hex[:8]}" if overwrite else name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, FILE_MODE, dir_fd=self.fd)
        except FileExistsError:
            raise OutputExistsError(
                f"{what} {str(self.path / name)!r} exists; ask for overwrite to replace it"
            ) from None
        os.fchmod(fd, FILE_MODE)  # exact, whatever the umask
        return NewFile(self, fd, temp, name)

    def symlink(self, target: str, name: str, overwrite: bool, what: str) -> None:
        """Copy a symbolic link as a link (its target is data, never read through)."""
        self.check_new(name, overwrite, what)
        if overwrite and self.exists(name):
            os.unlink(name, dir_fd=self.fd)
        os.symlink(target, name, dir_fd=self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NewFile:
    """A file being created in a ConfinedDir: ``fd`` to write, then ``commit`` (or ``abort`` to remove it)."""

    def __init__(self, directory: ConfinedDir, fd: int, temp: str, name: str) -> None:
        self.dir, self.fd, self.temp, self.name = directory, fd, temp, name

    @property
    def path(self) -> Path:
        return self.dir.path / self.name

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.temp != self.name:
            os.replace(self.temp, self.name, src_dir_fd=self.dir.fd, dst_dir_fd=self.dir.fd)
        os.fsync(self.dir.fd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.temp, dir_fd=self.dir.fd)
        except FileNotFoundError:
            pass

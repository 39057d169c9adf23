"""A private, writable, throw-away view of one directory inside a backup: what an application server is started on.

Two ways to make one, tried in this order:

``fuse``: a read-only FUSE file system over the file-level recovery layer (``fuseview``, its own process) as the
lower layer of a kernel overlayfs whose upper layer is a private directory. Nothing is copied before the server
starts: files are fetched from the repository when read, and copied up (by the kernel) only when written. Needs
/dev/fuse and the right to mount (root, or CAP_SYS_ADMIN in a container).

``copy``: every file of the directory extracted into the private directory first, refused beforehand when the
directory is larger than ``copy_limit`` bytes. Works anywhere; costs the full copy.

Either way the backup is only read, everything written lands under the workspace, and leaving the context
unmounts and deletes it all. While the view is open, ``guard`` keeps the work directory's file system above its
reserve (``space``): a job is refused below it, and stopped when it would fall below.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from appliance.errors import BootbackError, ItemRecoveryError, NoSpaceError
from appliance.files import FileBrowser, browse
from appliance.items.space import SpaceGuard, default_reserve
from appliance.items.viewtree import nodes
from appliance.repo import Repository
from appliance.repo.backends import repository_arg
from appliance.repo.keys import KEY_FILE_ENV, PASSPHRASE_ENV, KeySource
from appliance.units import GiB

MOUNT_TIMEOUT = 30.0  # seconds for the FUSE process to open the repository and mount
DEFAULT_COPY_LIMIT = 8 * GiB


def check_reachable(path: Path, uid: int) -> None:
    """A server running as ``uid`` must be able to walk down to its data: every ancestor traversable by it."""
    for parent in [path, *path.parents]:
        info = parent.stat()
        if info.st_uid == uid or info.st_mode & stat.S_IXOTH:
            continue
        raise ItemRecoveryError(
            f"work directory {path} is not reachable by uid {uid}: {parent} has mode "
            f"{stat.filemode(info.st_mode)} (choose a --work-dir whose parents are world-traversable)"
        )


OWNER_FILE = "owner.pid"  # the process that made a workspace
SERVER_FILE = "server.pid"  # a server started in it (its own process group), written by the server's module


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def sweep(work_root: Path) -> list[Path]:
    """Remove the workspaces of commands that died without cleaning up (SIGKILL, power cut): stop their server
    (only if its command line names the workspace, so a reused pid is never hit), unmount, delete."""
    swept = []
    for space in sorted(work_root.iterdir()) if work_root.is_dir() else []:
        owner = _pid(space / OWNER_FILE)
        if not re.fullmatch(r"[0-9a-f]{8}", space.name) or owner is None or _alive(owner):
            continue
        for server in space.glob(f"*/{SERVER_FILE}"):
            pid = _pid(server)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
            except OSError:
                cmdline = b""
            if pid and str(space).encode() in cmdline:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        if os.path.ismount(space / "data"):
            subprocess.run(["umount", "-l", str(space / "data")], capture_output=True)
        if os.path.ismount(space / "lower"):
            subprocess.run(["fusermount", "-u", "-z", str(space / "lower")], capture_output=True)
        shutil.rmtree(space, ignore_errors=True)
        swept.append(space)
    return swept


class CowView:
    """``with CowView(...) as path:`` a directory holding the backup's ``root`` that the caller may change.

    ``root`` is a file browser path (``/p1/var/lib/postgresql/15/main``); ``owner`` the (uid, gid) every file
    appears to belong to, so a server dropping root privileges can use it.
    """

    def __init__(
        self,
        repo: str,
        point: str,
        disk: str,
        root: str,
        work_root: Path,
        owner: tuple[int, int],
        mode: str = "auto",
        copy_limit: int = DEFAULT_COPY_LIMIT,
        keys: KeySource | None = None,
        reserve: int | None = None,
    ) -> None:
        if mode not in ("auto", "fuse", "copy"):
            raise ItemRecoveryError(f"unknown view mode {mode!r} (auto, fuse or copy)")
        self.repo, self.point, self.disk, self.root = repo, point, disk, root
        self.work_root = Path(work_root)
        self.owner = owner
        self.requested = mode
        self.mode = ""  # the one used: fuse or copy
        self.copy_limit = copy_limit
        self.keys = keys
        self.space: Path | None = None  # the private workspace
        self._fuse: subprocess.Popen | None = None
        self._mounts: list[Path] = []
        self.guard = SpaceGuard(self.work_root, default_reserve() if reserve is None else reserve)

    # workspace ---------------------------------------------------------------------------------------------
    def _make_space(self) -> Path:
        space = self.work_root / secrets.token_hex(4)
        space.mkdir(mode=0o700)
        (space / OWNER_FILE).write_text(f"{os.getpid()}\n")
        os.chown(space, *self.owner)
        check_reachable(space, self.owner[0])
        return space

    def __enter__(self) -> Path:
        self.work_root.mkdir(parents=True, exist_ok=True, mode=0o755)
        sweep(self.work_root)  # a killed command's workspace: its space counts before the check
        self.guard.start()  # refused before anything is made when free space is already below the reserve
        try:
            self.space = self._make_space()
            if self.requested in ("auto", "fuse"):
                try:
                    return self._enter_fuse()
                except ItemRecoveryError:
                    if self.requested == "fuse":
                        raise
                    self._unmount()  # then copy: a container without the right to mount still works
            return self._enter_copy()
        except BaseException as exc:
            self.close(exc)
            raise

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Unmount and delete; when the reserve was crossed (or the job failed while below it: a server that hit
        ENOSPC before the next poll), the one error that says so, not the stopped server's."""
        self.guard.stop()
        if exc is not None and self.guard.tripped is None:
            with suppress(ItemRecoveryError, OSError):
                self.guard.check()
        self._unmount()
        if self.space is not None:
            shutil.rmtree(self.space, ignore_errors=True)
            self.space = None
        if self.guard.tripped is not None:
            raise self.guard.error(self.guard.tripped) from exc

    @property
    def data(self) -> Path:
        assert self.space is not None, "the view is not open"
        return self.space / "data"

    # fuse + overlayfs --------------------------------------------------------------------------------------
    def _enter_fuse(self) -> Path:
        if not os.path.exists("/dev/fuse"):
            raise ItemRecoveryError("no /dev/fuse: the copy-on-write view needs FUSE")
        space = self.space
        lower, upper, work = space / "lower", space / "upper", space / "work"
        for d in (lower, upper, work, self.data):
            d.mkdir(mode=0o700)
        os.chown(upper, *self.owner)
        os.chown(self.data, *self.owner)
        cmd = [
            sys.executable,
            "-m",
            "appliance.items.fuseview",
            self.repo,
            self.point,
            self.disk,
            self.root,
            str(lower),
        ]
        cmd += ["--uid", str(self.owner[0]), "--gid", str(self.owner[1])]
        self._fuse = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self._child_env()
        )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(lower):
            if self._fuse.poll() is not None:
                err = (self._fuse.stderr.read() or "").strip().splitlines()
                raise ItemRecoveryError(f"the FUSE view of {self.root} did not start: {err[-1] if err else '?'}")
            if time.monotonic() > deadline:
                raise ItemRecoveryError(f"the FUSE view of {self.root} did not mount within {MOUNT_TIMEOUT:.0f} s")
            time.sleep(0.02)
        self._mounts.append(lower)
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        p = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.data)], capture_output=True, text=True
        )
        if p.returncode != 0:
            raise ItemRecoveryError(f"cannot mount the overlay on the FUSE view: {p.stderr.strip()}")
        self._mounts.append(self.data)
        self.mode = "fuse"
        return self.data

    def _child_env(self) -> dict[str, str]:
        """The FUSE process opens the repository itself: the key reaches it in its environment (as the daemon's
        reaches the web app), never on its command line, which every local user can read."""
        env = dict(os.environ)
        if self.keys is not None:
            env.pop(KEY_FILE_ENV, None)
            env.pop(PASSPHRASE_ENV, None)
            if self.keys.key_files:
                env[KEY_FILE_ENV] = os.pathsep.join(str(Path(p).resolve()) for p in self.keys.key_files)
            if self.keys.passphrase is not None:
                env[PASSPHRASE_ENV] = self.keys.passphrase
        return env

    def _unmount(self) -> None:
        for point in reversed(self._mounts):
            tool = ["fusermount", "-u", "-z"] if point.name == "lower" else ["umount", "-l"]
            subprocess.run([*tool, str(point)], capture_output=True)
        self._mounts.clear()
        if self._fuse is not None:
            try:
                self._fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._fuse.kill()
                self._fuse.wait()
            with suppress(Exception):
                self._fuse.stderr.close()
            self._fuse = None

    # copy --------------------------------------------------------------------------------------------------
    def _enter_copy(self) -> Path:
        repo = Repository.open(repository_arg(self.repo), self.keys)
        browser: FileBrowser = browse(repo, repo.resolve(self.point), self.disk)
        entries = list(nodes(browser, self.root))
        total = sum(n.entry.size for n in entries if n.entry.kind == "file")
        if total > self.copy_limit:
            raise ItemRecoveryError(
                f"{self.root} holds {total:,} bytes, more than the copy limit of {self.copy_limit:,} "
                "(FUSE is not available here to avoid the copy)"
            )
        dest = self.data
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(mode=0o700)
        try:
            for node in entries:
                target, entry, opener = dest / node.rel, node.entry, node.opener
                if entry.kind == "directory":
                    target.mkdir(mode=0o700)
                elif entry.kind == "file" and opener is not None:
                    with opener() as src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    target.chmod(0o600)
                else:
                    continue
                os.chown(target, *self.owner)
        except OSError as exc:
            if exc.errno == 28:
                raise NoSpaceError(f"no space left copying {self.root} into {dest}") from exc
            raise
        except BootbackError:
            raise
        os.chown(dest, *self.owner)
        self.mode = "copy"
        return dest

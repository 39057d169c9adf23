"""Sessions: publish restore points as VM folders, keep instant sessions across restarts, discard sandboxes,
migrate a running session's disks out, and guard the cache's free space."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from appliance.atomicfile import write_atomic
from appliance.cache.overlay import DIR_MODE, FILE_MODE, WriteCache
from appliance.datastore.backend import DatastoreBackend
from appliance.datastore.descriptors import disk_names, published_vmx, vmdk_descriptor
from appliance.datastore.folder import SessionFolder
from appliance.errors import LimitExceededError, NoSpaceError, SessionError, SessionNotFoundError, UsageError
from appliance.repo import DiskReader, Repository
from appliance.repo.prefetch import Prefetch
from appliance.repo.readcache import ReadCache
from appliance.sessions.confine import ConfinedDir
from appliance.sessions.migrate import Migration
from appliance.sessions.records import MODES, SessionRecord
from appliance.units import GiB

log = logging.getLogger("bootback.sessions")

MAX_SESSIONS = 100  # sessions published at once (each holds two descriptors per disk, its cache, its folder)
MAX_SLOT = (1 << 20) - 1  # slots are the top bits of file ids (datastore/backend.py) and are never reused


MIN_PREFIX = 4  # characters of a session id that name it, when not given whole


class SessionManager:
    def __init__(
        self,
        state_dir: Path,
        repos: dict[str, Repository],
        backend: DatastoreBackend,
        min_free_bytes: int = 100 * GiB,
        warn_free_fraction: float = 0.1,
        cache_dir: Path | None = None,
        read_cache: ReadCache | None = None,
        cache_dirs: list[Path] | None = None,
        migration_dirs: list[Path] | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        """Write caches go under ``cache_dir`` (default STATE/cache) or, when a caller names one, under one of
        ``cache_dirs``; migration outputs only under ``migration_dirs`` (none: migration is refused)."""
        self.read_cache = read_cache
        self.state = Path(state_dir)
        self.sessions_dir = self.state / "sessions"
        self.default_cache = Path(cache_dir) if cache_dir else self.state / "cache"
        self.cache_dirs = list(dict.fromkeys([self.default_cache, *(cache_dirs or [])]))
        self.migration_dirs = list(migration_dirs or [])
        self.max_sessions = max_sessions
        self.default_cache.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self.default_cache == self.state / "cache":
            os.chmod(self.default_cache, DIR_MODE)  # ours: private (older versions made it world-readable)
        self.repos = repos
        self.backend = backend
        self.min_free = min_free_bytes
        self.warn_fraction = warn_free_fraction
        self._warned: dict[str, str] = {}
        self.records: dict[str, SessionRecord] = {}
        self.folders: dict[str, SessionFolder] = {}
        self.migrations: dict[str, Migration] = {}
        self.readers: dict[str, list[DiskReader]] = {}  # session -> its disks' readers
        self.prefetches: dict[str, list[Prefetch]] = {}  # session -> its disks' warm-ups (publish --prefetch)
        self._lock = threading.RLock()
        self.sessions_dir.mkdir(parents=True, exist_ok=True)

    # --- repositories ---------------------------------------------------------------------------------
    def repo(self, name: str | None) -> tuple[str, Repository]:
        if not self.repos:
            raise UsageError("no repository is served yet: create one in the appliance's repository directory")
        if name is None:
            if len(self.repos) != 1:
                raise UsageError(f"several repositories are served ({', '.join(self.repos)}): name one")
            name = next(iter(self.repos))
        for key, repo in self.repos.items():
            if name in (key, repo.location):
                return key, repo
        raise UsageError(f"unknown repository {name!r}; served: {', '.join(self.repos)}")

    # --- lifecycle ------------------------------------------------------------------------------------
    def restore(self) -> None:
        """At daemon start: bring instant sessions back with their writes; sandboxes are throw-away."""
        for path in sorted(self.sessions_dir.glob("*.json")):
            try:
                rec = SessionRecord.load(path)
            except (OSError, ValueError, TypeError) as exc:
                log.error("cannot read session record %s: %s", path, exc)
                continue
            if rec.mode == "sandbox":
                log.info("discarding sandbox session %s left from the last run", rec.id)
                self._discard(rec)
                continue
            try:
                self._mount(rec)
                log.info("restored instant session %s (%s)", rec.id, rec.folder)
            except Exception as exc:  # noqa: BLE001 - one bad session must not keep the others down
                log.error("cannot restore session %s: %s", rec.id, exc)

    def _next_slot(self) -> int:
        """A slot never used before: past the persisted counter and past every session record on disk (the
        counter may be missing or stale), refused if a running session holds it."""
        path = self.state / "next-slot"
        try:
            slot = int(path.read_text())
        except (FileNotFoundError, ValueError):
            slot = 1
        used = [r.slot for r in self.records.values()]
        for rec_path in self.sessions_dir.glob("*.json"):
            try:
                used.append(int(json.loads(rec_path.read_text())["slot"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        slot = max([slot, *(u + 1 for u in used)])
        if slot > MAX_SLOT or slot in {r.slot for r in self.records.values()}:
            raise SessionError(f"no free datastore slot (next would be {slot}, at most {MAX_SLOT})")
        write_atomic(path, str(slot + 1))
        return slot

    def space_warnings(self) -> dict[str, str]:
        """Cache locations in use (the default and each session's) that are short of space, with the reason;
        logged once each time a location crosses into or out of a warning."""
        bases = {self.default_cache} | {Path(r.cache_dir).parent for r in self.records.values()}
        now = {}
        for base in sorted(bases):
            warning = self.check_space(base)["warning"]
            if warning:
                now[str(base)] = warning
        for path, warning in now.items():
            if self._warned.get(path) != warning:
                log.warning("write cache %s: %s; sessions there may soon get NFS3ERR_NOSPC", path, warning)
        for path in set(self._warned) - set(now):
            log.info("write cache %s: free space is back above the thresholds", path)
        self._warned = now
        return now

    def check_space(self, cache_dir: Path) -> dict:
        probe = cache_dir
        while not probe.exists():
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        status = {
            "path": str(cache_dir),
            "total": usage.total,
            "free": usage.free,
            "min_free": self.min_free,
            "warning": None,
        }
        if usage.free < self.min_free:
            status["warning"] = "below minimum free space"
        elif usage.free < usage.total * self.warn_fraction:
            status["warning"] = f"less than {int(self.warn_fraction * 100)}% free"
        return status

    def check_capacity(self, more: int) -> None:
        """Refuse ``more`` new sessions when they would pass the total bound."""
        if len(self.records) + more > self.max_sessions:
            raise LimitExceededError(
                f"{len(self.records)} sessions run and {more} more were asked for: at most {self.max_sessions} "
                "run at once on this appliance (--max-sessions); stop some first"
            )

    def _check_free(self, base: Path) -> None:
        space = self.check_space(base)
        if space["free"] < self.min_free:
            raise NoSpaceError(
                f"cache {base} has {space['free'] / GiB:.1f} GiB free, below the minimum of "
                f"{self.min_free / GiB:.1f} GiB; free space, choose another --cache, or lower the minimum"
            )
        if space["warning"]:
            log.warning("cache %s: %s", base, space["warning"])

    def publish(
        self,
        vm: str,
        point: str = "latest",
        mode: str = "instant",
        cache_dir: str | None = None,
        repo: str | None = None,
        prefetch: bool = False,
    ) -> SessionRecord:
        """A new session of ``vm@point``; with ``prefetch`` its disks' read cache is warmed in the background."""
        if mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if prefetch and self.read_cache is None:
            raise UsageError("prefetch needs the read cache: serve with --read-cache SIZE (not 0)")
        repo_key, repository = self.repo(repo)
        rp = repository.restore_point(vm, point)
        sid = uuid.uuid4().hex[:8]
        base_dir = ConfinedDir.open(self.cache_dirs, cache_dir or self.default_cache, "write cache")
        with self._lock:
            try:
                base = base_dir.path
                self._check_free(base)
                self.check_capacity(1)
                slot = self._next_slot()
                base_dir.subdir(sid, True, "write cache").close()
            finally:
                base_dir.close()
            folder_name = f"{vm}-{mode}-{sid}"
            rec = SessionRecord(
                id=sid,
                vm=vm,
                point=rp.id,
                repo=repo_key,
                mode=mode,
                slot=slot,
                folder=folder_name,
                cache_dir=str(base / sid),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            session_dir = Path(rec.cache_dir)
            files = session_dir / "files"
            files.mkdir(mode=DIR_MODE)
            published = disk_names(rp.disks)
            label = "bootback instant recovery" if mode == "instant" else "bootback sandbox"
            _write_private(files / f"{vm}.vmx", published_vmx(vm, rp.id, rp.vmx, published, label))
            for d in published:
                _write_private(files / d.descriptor_name, vmdk_descriptor(d))
                rec.disks.append(
                    {
                        "key": d.entry.name,
                        "descriptor": d.descriptor_name,
                        "extent": d.extent_name,
                        "size": d.extent_size,
                    }
                )
            rec.save(self.sessions_dir)
            try:
                self._mount(rec)
            except Exception:
                self._discard(rec)
                raise
            if prefetch:
                self.prefetches[rec.id] = [Prefetch(r).start() for r in self.readers[rec.id]]
        log.info("published %s@%s as %s (%s)", vm, rp.id, folder_name, mode)
        return rec

    def _mount(self, rec: SessionRecord) -> None:
        _, repository = self.repo(rec.repo)
        rp = repository.restore_point(rec.vm, rec.point)
        caches = {}
        session_dir = Path(rec.cache_dir)
        readers = self.readers[rec.id] = []
        for d in rec.disks:
            reader = repository.open_disk(rp, d["key"], read_cache=self.read_cache)
            readers.append(reader)
            caches[d["extent"]] = WriteCache(
                session_dir / "disks",
                d["extent"],
                reader.read,
                d["size"],
                backing_nowait=reader.read_cached,
                backing_range=reader.file_range,
            )
        folder = SessionFolder(session_dir, caches)
        self.backend.add_folder(rec.slot, rec.folder, folder)
        self.records[rec.id] = rec
        self.folders[rec.id] = folder

    def get(self, sid: str) -> SessionRecord:
        """A session by its id, its folder name, or an unambiguous id prefix of at least MIN_PREFIX characters
        (so an empty or one-letter id can never pick 'the only session' by accident)."""
        rec = self.records.get(sid)
        if rec is None:
            matches = [
                r for r in self.records.values() if (len(sid) >= MIN_PREFIX and r.id.startswith(sid)) or r.folder == sid
            ]
            if len(matches) != 1:
                hint = f" (give at least {MIN_PREFIX} characters of its id)" if len(sid) < MIN_PREFIX else ""
                raise SessionNotFoundError(f"no session {sid!r}{hint}")
            rec = matches[0]
        return rec

    def stop(self, sid: str, force: bool = False) -> SessionRecord:
        with self._lock:
            rec = self.get(sid)
            mig = self.migrations.get(rec.id)
            if mig is not None and mig.running:
                raise SessionError(f"session {rec.id} is being migrated; wait for it to finish")
            if rec.mode == "instant" and not rec.migrated_to and not force and self.changed_bytes(rec.id):
                raise SessionError(
                    f"instant session {rec.id} has changes that were never migrated; migrate it first, "
                    "or stop it with --force to discard them"
                )
            for warm_up in self.prefetches.pop(rec.id, []):
                warm_up.stop()
            folder = self.backend.remove_folder(rec.slot)
            if folder is not None:
                folder.close()
            self.records.pop(rec.id, None)
            self.folders.pop(rec.id, None)
            self.readers.pop(rec.id, None)
            self._discard(rec)
        log.info("stopped session %s (%s)", rec.id, rec.folder)
        return rec

    def _discard(self, rec: SessionRecord) -> None:
        shutil.rmtree(rec.cache_dir, ignore_errors=True)
        rec.delete(self.sessions_dir)

    def changed_bytes(self, sid: str) -> int:
        folder = self.folders[sid]
        return sum(e.cache.changed_bytes() for e in folder.extents)

    def usage(self, sid: str) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.records[sid].cache_dir):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def describe(self, rec: SessionRecord, export_path: str, host: str) -> dict:
        doc = asdict(rec)
        folder = self.folders.get(rec.id)
        doc["files"] = sorted(n for n, _ in folder.listing(folder.root())) if folder else []
        doc["cache_used_bytes"] = self.usage(rec.id) if folder else 0
        doc["changed_bytes"] = self.changed_bytes(rec.id) if folder else 0
        doc["nfs_url"] = f"nfs://{host}{export_path.rstrip('/')}/{rec.folder}"
        doc["path"] = f"{export_path.rstrip('/')}/{rec.folder}"
        mig = self.migrations.get(rec.id)
        doc["migration"] = mig.status() if mig else None
        warm_ups = self.prefetches.get(rec.id)
        doc["prefetch"] = [{**w.status(), "running": w.running} for w in warm_ups] if warm_ups else None
        return doc

    # --- migration ------------------------------------------------------------------------------------
    def migrate(self, sid: str, output: str, overwrite: bool = False) -> Migration:
        """Copy a session's disks out to ``output``, under the configured migration directories only; an
        existing file there is replaced only with ``overwrite``."""
        if not isinstance(output, str) or not isinstance(overwrite, bool):
            raise UsageError("migrate: 'output' is a path string and 'overwrite' a boolean")
        with self._lock:
            rec = self.get(sid)
            old = self.migrations.get(rec.id)
            if old is not None and old.running:
                raise SessionError(f"session {rec.id} is already being migrated")
            folder = self.folders[rec.id]
            mig = Migration(
                rec, folder, output, self.migration_dirs, overwrite, on_done=lambda m: self._migrated(rec, m)
            )
            self.migrations[rec.id] = mig
            mig.start()
            return mig

    def _migrated(self, rec: SessionRecord, mig: Migration) -> None:
        if mig.error is None:
            rec.migrated_to = str(mig.output)
            rec.save(self.sessions_dir)

    def flush(self) -> None:
        for folder in self.folders.values():
            folder.flush()

    def close(self) -> None:
        for m in self.migrations.values():
            m.cancel()
        for sid in list(self.folders):
            folder = self.backend.remove_folder(self.records[sid].slot)
            if folder is not None:
                folder.flush()
                folder.close()
        self.folders.clear()
        time.sleep(0)


def _write_private(path: Path, text: str) -> None:
    """A new file of the session's folder, 0600; never through a link, never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)

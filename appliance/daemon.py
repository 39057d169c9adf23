"""The appliance daemon: NFS server + datastore + sessions + control socket (+ the web app on 6161)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from appliance.config import DaemonConfig
from appliance.datastore.backend import DatastoreBackend
from appliance.errors import (
    BootbackError,
    DiskTooLargeError,
    IntegrityError,
    LimitExceededError,
    NoSpaceError,
    UsageError,
)
from appliance.lab.service import Labs
from appliance.repo import Repository
from appliance.repo.backends import is_s3
from appliance.repo.prefetch import rewarm
from appliance.repo.readcache import ReadCache
from appliance.repo.repository import find_repositories
from appliance.sessions.control import ControlServer
from appliance.sessions.manager import SessionManager
from appliance.verification import Verifications, local_nfs_host
from nfsd.errors import StatusMapping
from nfsd.exports import Export
from nfsd.handles import HandleCodec
from nfsd.server import NFSServer
from nfsd.vfs import Status

log = logging.getLogger("bootback")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


# Domain errors as the NFS client sees them, added to this daemon's NFS server's one translation table.
NFS_STATUS_OF: tuple[StatusMapping, ...] = (
    (NoSpaceError, Status.NOSPC),
    (IntegrityError, Status.IO),
    (DiskTooLargeError, Status.FBIG),
)


class ServedRepositories(Mapping[str, Repository]):
    """The repositories served, by name; shared by reference with the session manager, whose threads (control
    operations, NFS workers) iterate it while a rescan adds one. Copy-on-write: an addition publishes a new
    dict, so a reader iterates a snapshot that never changes under it (no "changed size during iteration")."""

    def __init__(self) -> None:
        self._map: dict[str, Repository] = {}

    def __getitem__(self, name: str) -> Repository:
        return self._map[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def add(self, name: str, repo: Repository) -> None:
        """Callers hold the daemon's lock (one writer); readers need none."""
        self._map = {**self._map, name: repo}


# Starts the web app as a child process: (state_dir, bind=, port=, advertise=) -> the process. Passed in by the
# composition root (the CLI): the domain does not import the web layer above it.
WebStarter = Callable[..., subprocess.Popen]


class Daemon:
    def __init__(self, config: DaemonConfig, start_web: WebStarter | None = None) -> None:
        """``start_web``: how to start the web app when ``config.web`` (None: no web app)."""
        self.config = config
        self._start_web = start_web
        state = config.state_dir = Path(config.state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        self.repos = ServedRepositories()
        self._repos_lock = threading.Lock()  # one writer of self.repos at a time
        self._refused: dict[Path, float] = {}  # repository -> its config's mtime when it could not be opened
        self._damaged_logged: set[tuple[str, str]] = set()  # (repository, error) logged once, not at every look
        if not config.repos and not config.repo_dirs:
            raise UsageError("no repository to serve: pass --repo REPO, or --repo-dir DIR holding repositories")
        for path in config.repos:
            repo = Repository.open(path if is_s3(path) else Path(path).resolve())
            with self._repos_lock:
                self._add_repository(repo)
        self.rescan_repositories()
        if not self.repos:
            log.warning(
                "no repository under %s yet: new ones are served as they appear", ", ".join(map(str, config.repo_dirs))
            )
        self.backend = DatastoreBackend(state / "datastore-root")
        self.read_cache = ReadCache(state / "read-cache", config.read_cache_bytes) if config.read_cache_bytes else None
        migration_dirs = config.allowed_migration_dirs()
        if config.migration_dirs is None:
            (state / "migrations").mkdir(mode=0o700, exist_ok=True)  # the default place; others are the operator's
        self.sessions = SessionManager(
            state,
            self.repos,
            self.backend,
            min_free_bytes=config.min_free_bytes,
            cache_dir=config.cache_dir,
            read_cache=self.read_cache,
            cache_dirs=config.cache_dirs,
            migration_dirs=migration_dirs,
            max_sessions=config.max_sessions,
        )
        self.export = Export(path=config.export_path, backend=self.backend, clients=config.clients)
        self.server = NFSServer(
            [self.export],
            codec=HandleCodec.from_file(state / "secret"),
            bind=config.bind,
            nfs_port=config.nfs_port,
            mount_port=config.mount_port,
            portmap_port=config.portmap_port,
            limits=config.nfs_limits,
            fixed_ports=config.fixed_ports,
            error_statuses=NFS_STATUS_OF,
        )
        self.verifications = Verifications(
            state,
            self.op_publish,
            self.op_stop,
            config.max_verifications,
            config.verify_max_memory_mib,
            nfs_host=local_nfs_host(config.bind),
            check_point=self._check_point,
        )
        self.labs = Labs(
            state,
            self.op_publish,
            self.op_stop,
            self.op_points,
            config.max_verifications,
            nfs_host=local_nfs_host(config.bind),
            space=lambda: self.sessions.check_space(self.sessions.default_cache),
        )
        self.control = ControlServer(state, self._ops())
        self.web: subprocess.Popen | None = None
        self._stop = asyncio.Event()
        self._space_task: asyncio.Task | None = None

    # --- repositories -------------------------------------------------------------------------------
    def _add_repository(self, repo: Repository) -> str:
        """Under self._repos_lock."""
        name = repo.name
        if name in self.repos:
            name = f"{name}-{repo.config.id[:6]}"
        self.repos.add(name, repo)
        return name

    def rescan_repositories(self) -> None:
        """Serve repositories created under the repository directories since the last look (a fleet role
        or an operator adds them while sessions run). One that cannot be opened is logged and skipped."""
        with self._repos_lock:
            known = {repo.location for repo in self.repos.values()}
            for directory in self.config.repo_dirs:
                try:
                    found = find_repositories(directory)
                except UsageError as exc:
                    log.warning("%s", exc)
                    continue
                for path in found:
                    path = path.resolve()
                    if str(path) in known:
                        continue
                    stamp = _mtime(path / "config.json")
                    if self._refused.get(path) == stamp:
                        continue  # said once already; looked at again when its config changes
                    try:
                        name = self._add_repository(Repository.open(path))
                    except Exception as exc:  # noqa: BLE001 - a bad repository must not take the others down
                        self._refused[path] = stamp
                        log.warning("not serving %s: %s", path, exc)
                        continue
                    known.add(str(path))
                    log.info("serving repository %s (%s)", name, path)

    # --- control operations ---------------------------------------------------------------------------
    def _ops(self) -> dict:
        return {
            "status": self.op_status,
            "publish": self.op_publish,
            "sessions": self.op_sessions,
            "session": self.op_session,
            "stop": self.op_stop,
            "migrate": self.op_migrate,
            "prefetch": self.op_prefetch,
            "migrate_status": self.op_migrate_status,
            "repositories": self.op_repositories,
            "points": self.op_points,
            "clients": lambda: self.server.clients(),
            "verify": self.verifications.start,
            "verifications": self.verifications.list,
            "verification": self.verifications.get,
            **self.labs.ops(),
        }

    def _doc(self, rec) -> dict:
        return self.sessions.describe(rec, self.export.path, self.config.host)

    def op_status(self) -> dict:
        self.rescan_repositories()
        ports = self.server.ports
        return {
            "export": self.export.path,
            "host": self.config.host,
            "local_nfs_host": local_nfs_host(self.config.bind),  # where verifiers on this host mount from
            "ports": {
                "portmap": ports.portmap,
                "nfs": ports.nfs,
                "mount": ports.mount,
                "portmap_external": ports.portmap_external,
                "control": self.config.control_port,
            },
            "repositories": sorted(self.repos),
            "sessions": len(self.sessions.records),
            "cache": self.sessions.check_space(self.sessions.default_cache),
            "cache_warnings": self.sessions.space_warnings(),
            "clients": self.server.clients(),
            "allowed_networks": self.export.clients,
            "nfs_clients": list(self.config.clients),
            "nfs_open_to_everyone": self.config.open_to_everyone(),
            "read_cache": self.read_cache.status() if self.read_cache else None,
            "labs": self.labs.metrics(),  # labs running, each group's last verification (web/metrics.py)
        }

    def op_publish(
        self,
        vm: str | None = None,
        vms: list[str] | None = None,
        point: str = "latest",
        mode: str = "instant",
        cache: str | None = None,
        repo: str | None = None,
        prefetch: bool = False,
    ) -> list[dict]:
        """Publish one VM or many (mass recovery); a VM may be 'name' or 'name@point'. ``prefetch``: warm each
        disk's read cache in the background (the whole disk comes local while the VM runs)."""
        if not isinstance(prefetch, bool):
            raise UsageError("publish: 'prefetch' is a boolean")
        if vms is not None and not (isinstance(vms, list) and all(isinstance(v, str) for v in vms)):
            raise UsageError("publish: 'vms' is a list of VM names")
        if vm is not None and not isinstance(vm, str):
            raise UsageError("publish: 'vm' is a VM name")
        targets = list(vms or []) + ([vm] if vm else [])
        if not targets:
            raise UsageError("publish needs 'vm' or 'vms'")
        if len(targets) > self.config.max_publish:
            raise LimitExceededError(
                f"publish: {len(targets)} VMs in one request, at most {self.config.max_publish} (--max-publish)"
            )
        self.sessions.check_capacity(len(targets))
        self.rescan_repositories()
        out = []
        for t in targets:
            name, _, p = t.partition("@")
            out.append(self._doc(self.sessions.publish(name, p or point, mode, cache, repo, prefetch)))
        return out

    def op_sessions(self) -> list[dict]:
        return [self._doc(r) for r in sorted(self.sessions.records.values(), key=lambda r: r.created)]

    def op_session(self, id: str) -> dict:  # noqa: A002 - the API's field name
        return self._doc(self.sessions.get(id))

    def op_stop(self, id: str, force: bool = False) -> dict:  # noqa: A002
        rec = self.sessions.stop(id, force=force)
        return {"id": rec.id, "folder": rec.folder, "stopped": True}

    def op_migrate(self, id: str, output: str, overwrite: bool = False) -> dict:  # noqa: A002
        return self.sessions.migrate(id, output, overwrite).status()

    def op_prefetch(self, id: str) -> dict:  # noqa: A002
        """Warm a running session's disks into the read cache in the background (what ``publish --prefetch``
        does at the start); its progress is the session's "prefetch" field."""
        if self.sessions.read_cache is None:
            raise UsageError("prefetch needs the read cache: serve with --read-cache SIZE (not 0)")
        with self.sessions._lock:  # against a concurrent stop: its readers stay while the warm-ups start
            rec = self.sessions.get(id)
            self.sessions.prefetches[rec.id] = rewarm(
                self.sessions.readers[rec.id], self.sessions.prefetches.get(rec.id)
            )
        return self._doc(rec)

    def op_migrate_status(self, id: str) -> dict:  # noqa: A002
        rec = self.sessions.get(id)
        mig = self.sessions.migrations.get(rec.id)
        if mig is None:
            raise UsageError(f"session {rec.id} has no migration")
        return mig.status()

    def _check_point(self, vm: str, point: str, repo: str | None) -> None:
        """Raise when ``vm``'s ``point`` is not in the repository (Verifications.start asks before it starts)."""
        self.rescan_repositories()
        _, repository = self.sessions.repo(repo)
        repository.restore_point(vm, point)

    def op_repositories(self) -> list[dict]:
        """Each repository with its readable points counted and its damaged point files listed; one that cannot
        be listed at all carries an "error" instead of failing the others."""
        self.rescan_repositories()
        out = []
        for name, repo in sorted(self.repos.items()):
            doc = {
                "name": name,
                "path": repo.location,
                "chunk_size": repo.config.chunk_size,
                "encryption": repo.config.encryption_name,
                "packs": repo.packed,
            }
            try:
                listing = repo.list_points()
            except BootbackError as exc:
                out.append({**doc, "vms": [], "points": 0, "damaged_points": [], "error": str(exc)})
                continue
            for bad in listing.damaged:
                if (name, bad.error) not in self._damaged_logged:
                    self._damaged_logged.add((name, bad.error))
                    log.error("repository %s: damaged restore point file: %s", name, bad.error)
            vms = {p.vm for p in listing.points} | {d.vm for d in listing.damaged}
            out.append(
                {
                    **doc,
                    "vms": sorted(vms),
                    "points": len(listing.points),
                    "damaged_points": [d.summary() for d in listing.damaged],
                }
            )
        return out

    def op_points(self, repo: str | None = None, vm: str | None = None) -> list[dict]:
        """Oldest first; a damaged point file is an entry {"vm", "id", "damaged": true, "error"}."""
        self.rescan_repositories()
        _, repository = self.sessions.repo(repo)
        return repository.list_points(vm).as_json()

    # --- running --------------------------------------------------------------------------------------
    async def _watch_space(self, every: float = 30.0) -> None:
        """Warn while sessions run, not only at publish: guests fill caches long after they started."""
        while True:
            try:
                await asyncio.to_thread(self.sessions.space_warnings)
            except OSError as exc:
                log.warning("cannot check cache space: %s", exc)
            await asyncio.sleep(every)

    async def start(self) -> None:
        if self.config.open_to_everyone():
            log.warning(
                "NFS export %s is open to every address (%s), with root unsquashed for the hypervisors: anyone who "
                "reaches this host can read and write the published disks. Name your hypervisors' networks with "
                "--clients or BOOTBACK_CLIENTS, e.g. BOOTBACK_CLIENTS=10.0.20.0/24",
                self.export.path,
                ",".join(self.config.clients),
            )
        self.sessions.restore()
        self._space_task = asyncio.get_running_loop().create_task(self._watch_space())
        ports = await self.server.start()
        await self.control.start()
        if self.config.web and self._start_web is not None:
            self.web = await asyncio.to_thread(
                self._start_web,
                self.config.state_dir,
                bind=self.config.bind,
                port=self.config.control_port,
                advertise=self.config.advertise,
                min_free=self.config.min_free_bytes,
            )
        moved = "; ".join(ports.moved)
        log.info(
            "bootback serving %s: NFS %d, MOUNT %d, portmapper %s%s; %d session(s)%s",
            self.export.path,
            ports.nfs,
            ports.mount,
            ports.portmap,
            " (external)" if ports.portmap_external else "",
            len(self.sessions.records),
            f"; {moved}" if moved else "",
        )

    async def shutdown(self) -> None:
        if self._space_task is not None:
            self._space_task.cancel()
        if self.web is not None and self.web.poll() is None:
            self.web.terminate()
            try:
                self.web.wait(10)
            except subprocess.TimeoutExpired:
                self.web.kill()
        await self.control.stop()
        await asyncio.to_thread(self.labs.close)  # guests killed, sandboxes stopped before the NFS server goes
        await self.server.stop()
        self.sessions.close()
        if self.read_cache is not None:
            self.read_cache.close()
        log.info("bootback stopped; instant sessions will come back at the next start")

    async def run(self) -> None:
        await self.start()
        print(f"bootback: ready, export {self.export.path} on NFS port {self.server.ports.nfs}", flush=True)
        await self.run_until_stopped()

    async def run_until_stopped(self) -> None:
        """Serve until SIGTERM/SIGINT, then shut down cleanly (sessions flushed, web app stopped)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

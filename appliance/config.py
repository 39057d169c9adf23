"""Daemon settings: defaults users would expect, overridable on the command line or by environment."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from appliance.units import GiB
from nfsd.limits import DEFAULT as DEFAULT_NFS_LIMITS
from nfsd.limits import Limits

CONTAINER_MIGRATIONS = "/migrations"


def default_state_dir() -> Path:
    env = os.environ.get("BOOTBACK_STATE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/bootback")
    return Path.home() / ".local" / "state" / "bootback"


def default_migration_dirs(state_dir: Path) -> list[Path]:
    """Without --migration-dir: STATE/migrations, and the container's /migrations volume when it exists."""
    dirs = [Path(state_dir) / "migrations"]
    if Path(CONTAINER_MIGRATIONS).is_dir():
        dirs.append(Path(CONTAINER_MIGRATIONS))
    return dirs


def default_export_name() -> str:
    host = socket.gethostname().split(".")[0] or "appliance"
    return f"/bootback-{host}"


@dataclass
class DaemonConfig:
    repos: list[Path]
    # Directories whose repositories are served, looked at again when asked for (new ones appear live).
    repo_dirs: list[Path] = field(default_factory=list)
    state_dir: Path = field(default_factory=default_state_dir)
    bind: str = "0.0.0.0"
    nfs_port: int = 2049
    mount_port: int = 1058
    portmap_port: int | None = 111
    control_port: int = 6161
    export_path: str = field(default_factory=default_export_name)
    clients: list[str] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    min_free_bytes: int = 100 * GiB
    advertise: str | None = None  # host name put in nfs:// URLs
    web: bool = True
    cache_dir: Path | None = None  # default write-cache location (STATE/cache when unset)
    cache_dirs: list[Path] = field(default_factory=list)  # further places a publish may name for its cache
    # Where migration outputs may be written (confined: nothing outside, no links followed); None: the default,
    # see default_migration_dirs.
    migration_dirs: list[Path] | None = None
    read_cache_bytes: int = 20 * GiB  # hydrated chunks of published disks (STATE/read-cache); 0: off
    max_sessions: int = 100  # sessions published at once
    max_publish: int = 25  # VMs in one publish request
    max_verifications: int = 2  # verifications booting at once
    verify_max_memory_mib: int = 4096  # guest RAM one verification may ask for
    nfs_limits: Limits = DEFAULT_NFS_LIMITS  # what NFS clients can make the daemon hold (docs/security.md)
    fixed_ports: bool = False  # refuse to start when NFS/MOUNT ports are taken instead of moving them

    def allowed_migration_dirs(self) -> list[Path]:
        return default_migration_dirs(self.state_dir) if self.migration_dirs is None else list(self.migration_dirs)

    def open_to_everyone(self) -> bool:
        """True when some allowed client network is a whole address family (0.0.0.0/0, ::/0)."""
        return any(ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in self.clients)

    @property
    def host(self) -> str:
        if self.advertise:
            return self.advertise
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::") else self.bind

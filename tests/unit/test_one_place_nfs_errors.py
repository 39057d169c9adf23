"""Issue 9: each NFS server has its own exception -> nfsstat3 table, given when it is built (nothing is
registered globally by importing the appliance), and the daemon's served repositories can be iterated by the
session manager while a rescan adds one."""

from __future__ import annotations

from pathlib import Path

from appliance.config import DaemonConfig
from appliance.daemon import NFS_STATUS_OF, Daemon
from appliance.errors import DiskTooLargeError, IntegrityError, NoSpaceError
from appliance.repo import Repository
from nfsd.exports import ExportTable
from nfsd.handles import HandleCodec
from nfsd.nfs3 import NFSv3
from nfsd.server import NFSServer
from nfsd.vfs import NFSError, Status


def test_domain_errors_map_only_on_the_server_given_them() -> None:
    plain = NFSv3(ExportTable(HandleCodec(bytes(32))))  # appliance.daemon is imported: it must not leak here
    appliance = NFSServer([], error_statuses=NFS_STATUS_OF, portmap_port=None).nfs
    try:
        for exc, status in (
            (NoSpaceError("cache full"), Status.NOSPC),
            (IntegrityError("chunk 12ab"), Status.IO),
            (DiskTooLargeError("disk 3 TiB"), Status.FBIG),
        ):
            assert appliance.errors.status_for(exc) == status
            assert plain.errors.status_for(exc) == Status.SERVERFAULT
        for server in (plain, appliance):  # the shared rules stay: NFSError's own status, then errno
            assert server.errors.status_for(NFSError(Status.STALE)) == Status.STALE
            assert server.errors.status_for(FileNotFoundError(2, "gone")) == Status.NOENT
    finally:
        plain.close()
        appliance.close()


def test_served_repositories_can_be_iterated_while_a_rescan_adds_one(tmp_path: Path) -> None:
    repos = tmp_path / "repos"
    Repository.init(repos / "a")
    config = DaemonConfig(
        repos=[],
        repo_dirs=[repos],
        state_dir=tmp_path / "state",
        nfs_port=0,
        mount_port=0,
        portmap_port=None,
        web=False,
        read_cache_bytes=0,
    )
    daemon = Daemon(config)
    try:
        reading = iter(daemon.sessions.repos.items())  # what SessionManager.repo() does in a control thread
        assert next(reading)[0] == "a"
        Repository.init(repos / "b")
        daemon.rescan_repositories()
        assert list(reading) == []  # the snapshot it started with; a plain dict raised "changed size"
        assert sorted(daemon.sessions.repos) == ["a", "b"]  # the manager sees the addition from then on
    finally:
        daemon.sessions.close()
        daemon.server.nfs.close()

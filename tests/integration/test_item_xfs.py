"""Item recovery from an XFS file system (``tests/integration/item_disks.build_xfs_disk``: made populated by
``mkfs.xfs -p``, no mount): a PostgreSQL 15 cluster found, listed and dumped through dissect.xfs and the
copy-on-write view, exactly as from ext4; and a cluster whose pg_wal is a symlink elsewhere on the same file
system (``initdb --waldir``), or a tablespace there, followed inside the backup, never onto the appliance's own
files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import bootback, tree_hash
from tests.integration.item_disks import PG_BIN, build_app_disk, build_xfs_disk
from tests.integration.item_space import small_reserve  # noqa: F401 (autouse: a reserve this machine has)

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="Debian's postgresql-15 is not installed")


@pytest.fixture(scope="module")
def xfs(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    built = build_xfs_disk(build_cache)
    repo = tmp_path_factory.mktemp("items-xfs") / "repo"
    bootback("init", repo, "--chunk-size", "256K", "--encryption", "none")
    bootback("backup", repo, "--vm", "xfs01", built / "xfs.raw")
    work = Path(tempfile.mkdtemp(prefix="bb-items-xfs-", dir="/var/tmp"))  # the 'postgres' user walks down to it
    work.chmod(0o755)
    expected = json.loads((build_app_disk(build_cache) / "expected.json").read_text())["clean"]
    before = tree_hash(repo)
    try:
        yield {"repo": repo, "work": work, "expected": expected}
        assert tree_hash(repo) == before, "item recovery changed the repository"
        assert os.listdir(work) == [], "a private view or server was left behind"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def items(xfs: dict, *args: str) -> str:
    return bootback("items", xfs["repo"], "xfs01", *args, "--work-dir", xfs["work"]).stdout


@pytest.mark.parametrize("path", ["/srv/pg-xfs", "/var/lib/postgresql/15/walink", "/srv/pg-ts"])
def test_a_cluster_on_xfs_is_listed_and_dumped(xfs: dict, path: str, tmp_path: Path) -> None:
    found = json.loads(items(xfs, "--json"))
    assert {"kind": "postgres", "disk": "xfs.raw", "volume": "disk", "path": path, "version": "15"} in found
    tables = json.loads(items(xfs, "postgres", "--path", path, "--list", "--json"))
    counts = {(t["database"], f"{t['schema']}.{t['table']}"): t["rows"] for t in tables}
    assert counts[("shop", "public.orders")] == 1500 and counts[("hr", "public.staff")] == 2
    if path == "/srv/pg-ts":
        assert counts[("shop", "public.archived")] == 77  # its files are in the tablespace: /srv/ts-elsewhere
    if path == "/srv/pg-xfs":  # the linked one proves its point by starting; one dump is enough
        out = tmp_path / "invoices.sql"
        items(xfs, "postgres", "--path", path, "--dump", "shop.sales.invoices", "-o", str(out))
        assert xfs["expected"]["shop"]["sales.invoices"] in out.read_text()


@pytest.mark.parametrize("mode", ["fuse", "copy"])
def test_a_link_elsewhere_in_the_backup_is_grafted_and_never_followed_onto_the_host(xfs: dict, mode: str) -> None:
    from appliance.items.cowview import CowView
    from appliance.items.service import Target

    target = Target.resolve(xfs["repo"], "xfs01")
    root = "/disk/var/lib/postgresql/15/walink"
    with CowView(
        target.repo, target.point, "xfs.raw", root, xfs["work"], (os.getuid(), os.getgid()), mode=mode
    ) as data:
        wal = data / "pg_wal"
        assert wal.is_dir() and not wal.is_symlink()
        names = os.listdir(wal)
        assert "archive_status" in names and any(len(n) == 24 for n in names), names  # /srv/wal-elsewhere's
        assert os.listdir(data / "pg_tblspc") == []  # -> /etc: not in the backup, never the appliance's
        assert not (data / "up").exists() and not (data / "up").is_symlink()  # -> its own ancestor: a loop

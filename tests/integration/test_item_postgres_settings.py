"""A backed-up PostgreSQL data directory cannot bring its own server settings: ALTER SYSTEM's
postgresql.auto.conf (a VM that was broken into may have set session_preload_libraries or dynamic_library_path,
which would run the intruder's code on the appliance) is emptied on the copy before the disposable server starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.items.postgres import DisposableServer, server_bindir
from appliance.items.runas import server_owner
from tests.integration.item_disks import PG_BIN, as_postgres

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (PG_BIN / "initdb").is_file(), reason="needs root and Debian's postgresql-15"
)


def test_the_backed_up_auto_conf_is_not_obeyed() -> None:
    base = Path(tempfile.mkdtemp(prefix="bb-pgset-", dir="/tmp"))  # short, and reachable by the postgres user
    try:
        base.chmod(0o755)
        datadir = base / "data"
        datadir.mkdir(mode=0o700)
        os.chown(datadir, *list(as_postgres().values())[:2])
        subprocess.run(
            [PG_BIN / "initdb", "-D", datadir, "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True,
            capture_output=True,
            **as_postgres(),
        )
        hostile = "session_preload_libraries = '/nonexistent/bootback-intruder.so'\n"
        (datadir / "postgresql.auto.conf").write_text(hostile)
        server = DisposableServer(datadir, server_bindir("15"), base / "run", server_owner("postgres"), "a test copy")
        try:
            server.start()
            assert "postgres" in server.databases()  # every connection would fail loading the library
            setting = server.query("postgres", "SELECT to_json(current_setting('session_preload_libraries'))")
            assert setting == ""
        finally:
            server.stop()
        assert "intruder" not in (datadir / "postgresql.auto.conf").read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)

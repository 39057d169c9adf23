"""Issue 9: the domain does not import the web layer above it. Credentials and logins are stored by
appliance.access; the CLI manages them with the web package unimportable, and a password change ends every
login of that user (and says so)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from appliance.access import logins
from appliance.access.credentials import Credentials

ROOT = Path(__file__).resolve().parents[2]
NO_WEB = "import sys; sys.modules['web'] = None  # any 'import web...' now fails\n"


def _run(code: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_WEB + code], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_the_daemon_and_the_access_commands_import_without_the_web_layer() -> None:
    done = _run("import appliance.daemon, appliance.access.credentials, appliance.commands.access; print('ok')")
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_bootback_password_works_without_web_and_ends_every_login(tmp_path: Path) -> None:
    Credentials(tmp_path).set_password("admin", "first password")
    kept = logins.start(tmp_path, "admin")
    assert logins.check(tmp_path, kept) == "admin"
    done = _run(
        f"from appliance.cli import main; sys.exit(main(['password', '--state', {str(tmp_path)!r}]))",
        stdin="second password\n",
    )
    assert done.returncode == 0, done.stderr
    assert "every login of 'admin' has ended" in done.stderr and "next login" not in done.stderr
    assert logins.check(tmp_path, kept) is None
    creds = Credentials(tmp_path)
    assert creds.check_password("admin", "second password") and not creds.check_password("admin", "first password")


def test_bootback_token_create_works_without_web(tmp_path: Path) -> None:
    done = _run(
        f"from appliance.cli import main; sys.exit(main(['token', 'create', 'ci', '--state', {str(tmp_path)!r}]))"
    )
    assert done.returncode == 0, done.stderr
    assert Credentials(tmp_path).check_token(done.stdout.strip())["name"] == "ci"

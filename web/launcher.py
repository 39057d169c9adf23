"""Start the web app (Flask under gunicorn, HTTPS) as a child of the daemon, on the control port."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from appliance.access.credentials import Credentials, secret_key, web_dir
from appliance.errors import ConfigError
from web.tls import ensure_certificate

log = logging.getLogger("bootback.web")


def prepare(state_dir: Path, advertise: str | None = None) -> tuple[Path, Path]:
    """First-start work done once, in the daemon: admin login, session key, TLS certificate."""
    wdir = web_dir(state_dir)
    generated = Credentials(state_dir).ensure_admin(
        password=os.environ.get("BOOTBACK_ADMIN_PASSWORD"),
        password_file=os.environ.get("BOOTBACK_ADMIN_PASSWORD_FILE"),
    )
    if generated:
        # Printed once, the way appliances hand out their first password; it is not stored in clear.
        print(
            f"bootback: admin page login: user 'admin', password '{generated}' (shown once; set "
            "BOOTBACK_ADMIN_PASSWORD or run 'bootback password' to choose one)",
            file=sys.stderr,
            flush=True,
        )
    secret_key(state_dir)
    return ensure_certificate(wdir, [advertise] if advertise else [])


def _probe(host: str, port: int) -> None:
    """One TLS handshake with the app (a bare TCP connect would make gunicorn log a TLS error)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # our own certificate; only liveness matters
    with socket.create_connection((host, port), timeout=0.5) as raw, ctx.wrap_socket(raw, server_hostname=host):
        pass


def _gunicorn_has(setting: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(s.name == setting for s in KNOWN_SETTINGS)


def start_web(
    state_dir: Path,
    bind: str,
    port: int,
    advertise: str | None = None,
    timeout: float = 30.0,
    min_free: int | None = None,
) -> subprocess.Popen:
    """``min_free``: the daemon's --min-free, which the page's item-recovery jobs keep free too."""
    cert, key = prepare(state_dir, advertise)
    host = f"[{bind}]" if ":" in bind else bind
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{host}:{port}",
        "--certfile",
        str(cert),
        "--keyfile",
        str(key),
        "--workers",
        "2",
        "--threads",
        "4",
        "--timeout",
        "120",
        "--graceful-timeout",
        "5",
        # Scripts poll jobs every few seconds on one connection; gunicorn's 2 s default closes it just as the
        # next request goes out (RemoteDisconnected). 75 s is what nginx and browsers live with.
        "--keep-alive",
        "75",
        "--access-logfile",
        "-",
        "--access-logformat",
        'web %(h)s "%(r)s" %(s)s %(b)s pid=%(p)s',
        "--name",
        "bootback-web",
        "web.wsgi:app",
    ]
    if _gunicorn_has("control_socket_disable"):
        cmd[-1:-1] = ["--no-control-socket"]  # gunicorn >= 25 opens ~/.gunicorn/gunicorn.ctl otherwise
    env = {**os.environ, "BOOTBACK_STATE": str(state_dir)}
    if min_free is not None:
        env["BOOTBACK_MIN_FREE"] = str(min_free)
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parent.parent)
    probe = "127.0.0.1" if bind in ("0.0.0.0", "") else ("::1" if bind == "::" else bind)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(
                f"the web app did not start on port {port} (exit {proc.returncode}); "
                "is the port taken? see the log above"
            )
        try:
            _probe(probe, port)
            log.info("admin page at https://%s:%d/", probe if bind in ("0.0.0.0", "::") else bind, port)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise ConfigError(f"the web app did not answer on port {port} within {timeout:.0f} s")

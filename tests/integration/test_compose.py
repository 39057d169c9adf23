"""compose.yaml on the real Docker engine (Debian's docker-compose): `up -d` brings the appliance to healthy with
the admin password from the secret file and the directories from the environment; `down -v` removes it all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.daemon_process import ROOT, free_port

pytestmark = pytest.mark.slow
PASSWORD = "compose-test-password"


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the compose plugin is installed (scripts/setup.sh installs it)")


def project_objects(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind in (["ps", "-a", "-q"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
        out = subprocess.run(["docker", *kind, "--filter", label], capture_output=True, text=True, check=True)
        found += out.stdout.split()
    return found


def test_compose_up_is_healthy_with_the_secret_and_down_cleans_up(appliance_image: str, tmp_path: Path) -> None:
    for name in ("repositories", "cache", "migrations"):
        (tmp_path / name).mkdir()
    secret = tmp_path / "admin-password"
    secret.write_text(PASSWORD + "\n")
    web = free_port()
    env = {
        **os.environ,
        "BOOTBACK_IMAGE": appliance_image,
        "BOOTBACK_CLIENTS": "127.0.0.0/8,172.16.0.0/12",
        "BOOTBACK_BIND": "127.0.0.1",
        "BOOTBACK_PORTMAP_PORT": str(free_port()),
        "BOOTBACK_NFS_PORT": str(free_port()),
        "BOOTBACK_MOUNT_PORT": str(free_port()),
        "BOOTBACK_WEB_PORT": str(web),
        "BOOTBACK_MIN_FREE": "1G",
        "BOOTBACK_REPOSITORIES": str(tmp_path / "repositories"),
        "BOOTBACK_CACHE": str(tmp_path / "cache"),
        "BOOTBACK_MIGRATIONS": str(tmp_path / "migrations"),
        "BOOTBACK_ADMIN_PASSWORD_SECRET": str(secret),
    }
    project = f"bootbacktest{uuid.uuid4().hex[:6]}"
    compose = [*compose_command(), "--project-name", project, "--file", str(ROOT / "compose.yaml")]

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done

    try:
        run("up", "-d", "--no-build")
        (container,) = run("ps", "-q").stdout.split()
        deadline = time.monotonic() + 120
        while True:
            state = json.loads(subprocess.check_output(["docker", "inspect", "--format", "{{json .State}}", container]))
            if state.get("Health", {}).get("Status") == "healthy":
                break
            logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True).stderr
            assert state["Running"] and time.monotonic() < deadline, f"{state}\n{logs[-3000:]}"
            time.sleep(1)
        # the admin password is the secret's (the page logs in with it), over the published, loopback-only port
        page = requests.Session()
        page.trust_env = False
        page.verify = str(tmp_path / "tls.crt")  # the appliance's own, from the named state volume
        subprocess.run(["docker", "cp", f"{container}:/var/lib/bootback/web/tls.crt", page.verify], check=True)

        def log_in(password: str) -> requests.Response:
            login = page.get(f"https://127.0.0.1:{web}/login", timeout=10)
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]
            form = {"csrf_token": csrf, "username": "admin", "password": password}
            return page.post(f"https://127.0.0.1:{web}/login", data=form, timeout=10, allow_redirects=False)

        assert log_in("not-" + PASSWORD).status_code == 401
        assert log_in(PASSWORD).status_code == 302
        mounts = {
            m["Destination"]: m
            for m in json.loads(
                subprocess.check_output(["docker", "inspect", "--format", "{{json .Mounts}}", container])
            )
        }
        assert mounts["/repositories"]["RW"] is False and mounts["/migrations"]["Source"] == str(
            tmp_path / "migrations"
        )
        assert project_objects(project), "compose made no labelled objects"
        # verification's qemu mounts from the daemon over the container's loopback: compose always allows it
        inside = json.loads(
            subprocess.check_output(["docker", "inspect", "--format", "{{json .Config.Env}}", container])
        )
        assert "BOOTBACK_CLIENTS=127.0.0.0/8,172.16.0.0/12,127.0.0.1/32" in inside, inside
    finally:
        run("down", "--volumes", "--timeout", "30")
    assert project_objects(project) == [], "compose down left containers, volumes or networks"

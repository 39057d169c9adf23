"""The roles with an S3 repository, for real: ``bootback_repository`` creates an encrypted repository in a bucket
of the session's Ceph RGW, and ``bootback_appliance`` runs the appliance container serving it (its restore points
listed through the API). Here, not in tests/s3, so that the appliance image is built once per session (the
gateway starts in 2-3 s). The S3 secret key and the passphrase reach the containers as 0600 files only: they never
appear in ansible's output (-v), on a command line or in ``docker inspect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.daemon_process import ROOT, bootback, free_port
from tests.s3.conftest import ACCESS, SECRET, Gateway, rgw, s3_repo  # noqa: F401 - the RGW fixtures

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def play(tmp_path: Path, role: str, variables: dict) -> str:
    """Apply ROLE to this machine with VARIABLES at -v; its whole output (the test fails if the play does)."""
    (tmp_path / f"{role}.yml").write_text(
        yaml.safe_dump([{"name": "Apply", "hosts": "all", "gather_facts": False, "roles": [{"role": role}]}])
    )
    (tmp_path / f"{role}.json").write_text(json.dumps(variables))
    p = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-v",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"@{tmp_path / f'{role}.json'}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(tmp_path / f"{role}.yml"),
        ],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = p.stdout + p.stderr
    (tmp_path / f"{role}.log").write_text(out)
    assert p.returncode == 0, out[-4000:]
    return out


def test_roles_create_and_serve_an_encrypted_s3_repository(
    rgw: Gateway,  # noqa: F811
    s3_repo: str,  # noqa: F811
    appliance_image: str,
    tmp_path: Path,
) -> None:
    passphrase = f"pp-{uuid.uuid4().hex}"
    secrets = (SECRET, passphrase)
    aws = {"aws_access_key_id": ACCESS, "aws_secret_access_key": SECRET, "aws_endpoint_url": rgw.endpoint}
    repository_vars = {
        "bootback_repository_dir": str(tmp_path / "repositories"),
        "bootback_repository_image": appliance_image,
        "bootback_repository_list": [
            {"name": "offsite", "location": s3_repo, "encryption": "aes-256-gcm", "packs": False}
        ],
        "bootback_repository_passphrase": passphrase,
        **{f"bootback_repository_{k}": v for k, v in aws.items()},
    }
    out = play(tmp_path, "bootback_repository", repository_vars)
    again = play(tmp_path, "bootback_repository", repository_vars)
    assert "changed=0" in again, f"a second run must leave the repository alone:\n{again[-2000:]}"
    for text in (out, again):
        assert not [s for s in secrets if s in text], "a secret is in ansible's output"
    bucket, prefix = s3_repo[len("s3://") :].split("/", 1)
    config = json.loads(rgw.client().get_object(Bucket=bucket, Key=f"{prefix}/config.json")["Body"].read())
    assert config["encryption"]["algorithm"] == "aes-256-gcm" and config["encryption"]["key"] is not None, config
    assert config["features"] == ["encryption"], config  # packs: False, where S3 would have them

    disk = tmp_path / "web01.raw"
    disk.write_bytes(os.urandom(1 << 20))
    os.environ["BOOTBACK_PASSPHRASE"] = passphrase  # the test's own CLI (s3_repo set the AWS_* variables)
    try:
        bootback("backup", s3_repo, "--vm", "web01", disk)
    finally:
        del os.environ["BOOTBACK_PASSPHRASE"]

    name = f"bootback-s3role-{uuid.uuid4().hex[:6]}"
    web = free_port()
    appliance_vars = {
        "bootback_appliance_image": appliance_image,
        "bootback_appliance_container_name": name,
        "bootback_appliance_base_dir": str(tmp_path / "srv"),
        "bootback_appliance_admin_password": "long-enough-password",
        "bootback_appliance_min_free": "1M",
        "bootback_appliance_read_cache": "64M",
        "bootback_appliance_network_mode": "host",
        "bootback_appliance_bind_address": "127.0.0.1",
        "bootback_appliance_published_ports": {
            "portmap": free_port(),
            "nfs": free_port(),
            "mount": free_port(),
            "web": web,
        },
        "bootback_appliance_nfs_client_networks": ["127.0.0.0/8"],
        "bootback_appliance_admin_networks": ["127.0.0.0/8"],
        "bootback_appliance_firewall": False,
        "bootback_appliance_healthcheck_interval": "2s",
        "bootback_appliance_s3_repositories": [s3_repo],
        "bootback_appliance_repository_passphrase": passphrase,
        **{f"bootback_appliance_{k}": v for k, v in aws.items()},
    }
    try:
        out = play(tmp_path, "bootback_appliance", appliance_vars)
        assert not [s for s in secrets if s in out], "a secret is in ansible's output"
        inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
        assert not [s for s in secrets if s in inspect], "a secret is in docker inspect"
        for f in ("aws-credentials", "repository-passphrase"):
            assert (tmp_path / "srv" / "secrets" / f).stat().st_mode & 0o777 == 0o600, f

        token = subprocess.run(
            ["docker", "exec", name, "bootback", "token", "create", "pytest"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        api = requests.Session()
        api.trust_env = False
        api.verify = False  # the appliance's self-signed certificate, reached by address
        api.headers["Authorization"] = f"Bearer {token}"
        url = f"https://127.0.0.1:{web}/api/v1/repositories/{s3_repo.rsplit('/', 1)[1]}"
        repo = api.get(url, timeout=30).json()
        assert repo["path"] == s3_repo and repo["encryption"] == "aes-256-gcm" and repo["packs"] is False, repo
        points = api.get(f"{url}/points", timeout=30).json()
        assert [p["vm"] for p in points] == ["web01"], points
    finally:
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout
        (tmp_path / "container.log").write_text(logs)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)

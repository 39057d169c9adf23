"""Schemathesis generates requests from our own OpenAPI document and throws them at a live appliance
(coverage, fuzzing and stateful phases): no request, valid or not, may get a server error (5xx)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.daemon_process import bootback, tree_hash, web_appliance

pytest.importorskip("schemathesis")


def test_generated_requests_never_get_a_server_error(tmp_path: Path) -> None:
    disk = tmp_path / "web01.raw"
    disk.write_bytes(random.Random(3).randbytes(2 << 20))
    repo = tmp_path / "repo"
    bootback("init", repo)
    bootback("backup", repo, "--vm", "web01", disk)
    before = tree_hash(repo)
    d, url = web_appliance(repo, tmp_path / "state", "fuzz-password")
    try:
        token = bootback("token", "create", "fuzz", "--state", d.state).stdout.strip()
        cert = str(d.state / "web" / "tls.crt")
        s = requests.Session()
        s.trust_env = False
        doc = s.get(f"{url}/api/v1/openapi.json", headers={"Authorization": f"Bearer {token}"}, verify=cert)
        schema = tmp_path / "openapi.json"
        schema.write_text(doc.text)
        p = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                str(schema),
                "--url",
                url,
                "-H",
                f"Authorization: Bearer {token}",
                "--tls-verify",
                cert,
                "-n",
                "25",
                "-c",
                "not_a_server_error",
                "--generation-deterministic",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
        assert "passed" in p.stdout
    finally:
        d.stop()
    assert d.proc.returncode == 0
    assert tree_hash(repo) == before

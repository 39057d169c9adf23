"""A real S3 service for the S3 repository tests: Ceph's RADOS Gateway, single node on loopback, started once per
test session by ``../shared/anchors/ceph-rgw.sh`` (CI runs with ``../shared`` beside the clone) and stopped at its
end.

``rgw`` is the gateway (endpoint, keys, a boto3 client, the gateway's own request counters, a way to stop and
restart it); ``s3_repo`` is a fresh bucket's ``s3://`` location with the AWS_* variables set for the test, so the
code under test and the ``bootback`` processes it starts find the gateway the standard way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "anchors" / "ceph-rgw.sh"
ACCESS, SECRET = "bootbacktest", "bootback-test-secret"
# The monitor refuses to start when its filesystem has under 1 % free (CI once failed so on a nearly full 250 GB
# disk that still had 4.8 GiB free). The tests' data lives in RAM (memstore), so the percentage means nothing here.
CEPH_ARGS = "--mon_data_avail_crit=0 --mon_data_avail_warn=0"


def _free_port() -> int:
    """A free port outside the OSD's 6800-7300 and the ephemeral range (so it stays free)."""
    while True:
        port = 20000 + int.from_bytes(os.urandom(2)) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Gateway:
    dir: Path
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # noqa: ANN201
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def counters(self) -> dict[str, int]:
        """The gateway's own request counters (``perf dump`` over its admin socket): what reached the server."""
        out = subprocess.run(
            ["ceph", "--admin-daemon", str(self.dir / "run" / "client.rgw.asok"), "perf", "dump"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return json.loads(out)["rgw"]

    def stop(self) -> None:
        """Stop the gateway (the cluster behind it stays up) and wait until it is gone. SIGTERM, not SIGKILL: a
        killed gateway's watches on the cluster keep the next one's first bucket operation waiting ~30 s. Not
        gone within 30 s, it is killed: its shutdown waits for threads asleep (CI saw 6.8 s, its lifecycle thread
        sleeping 5 s), and a gateway still going when the next one starts holds the port."""
        pid = int((self.dir / "run" / "client.rgw.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _gone(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)

    def start(self) -> None:
        p = subprocess.run(
            ["bash", str(SCRIPT), "start", str(self.dir), str(self.port)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "S3_ACCESS_KEY": ACCESS, "S3_SECRET_KEY": SECRET, "CEPH_ARGS": CEPH_ARGS},
        )
        if p.returncode != 0:
            raise RuntimeError(f"ceph-rgw.sh start failed: {p.stdout}{p.stderr}{self._log_errors()}")

    def _log_errors(self) -> str:
        """The daemons' own error lines (a CI log keeps the message, not the gateway's directory)."""
        lines = []
        for log in sorted((self.dir / "log").glob("*.log")):
            errors = [line for line in log.read_text(errors="replace").splitlines() if " -1 " in line]
            lines += [f"{log.name}: {line}" for line in errors[-5:]]
        return "".join(f"\n  {line}" for line in lines)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if shutil.which("radosgw") is None:
        pytest.fail("radosgw is not installed: scripts/setup.sh installs Ceph's packages")
    gw = Gateway(tmp_path_factory.mktemp("rgw"), _free_port())
    try:
        gw.start()
        yield gw
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(gw.dir)], capture_output=True, timeout=120)


@pytest.fixture
def s3_repo(rgw: Gateway, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket's repository location, with the AWS_* variables pointing at the gateway."""
    for name, value in rgw.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # the machine's ~/.aws must not interfere
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return f"s3://{rgw.new_bucket()}/repo"

"""Fixtures for the integration tests that need the appliance image on a real Docker engine."""

from __future__ import annotations

import subprocess

import pytest

from tests.daemon_process import ROOT

IMAGE = "bootback:test"


@pytest.fixture(scope="session")
def docker_engine():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"no Docker engine answers (scripts/setup.sh starts one): {exc}")
    return client


@pytest.fixture(scope="session")
def appliance_image(docker_engine) -> str:
    """The appliance image built from this checkout, once per test run (layers are cached between runs)."""
    subprocess.run([str(ROOT / "scripts" / "build-image.sh"), IMAGE], check=True, timeout=900, cwd=ROOT)
    return IMAGE

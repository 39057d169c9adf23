"""Fixtures for the integration tests that need the appliance image on a real Docker engine."""

from __future__ import annotations

import os
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
    """The appliance image built from this checkout, once per test run (layers are cached between runs);
    BOOTBACK_TEST_IMAGE names an image built already (e.g. from a clean export of a commit) to test instead."""
    prebuilt = os.environ.get("BOOTBACK_TEST_IMAGE")
    if prebuilt:
        docker_engine.images.get(prebuilt)  # fails the fixture when it does not exist
        return prebuilt
    subprocess.run([str(ROOT / "scripts" / "build-image.sh"), IMAGE], check=True, timeout=900, cwd=ROOT)
    return IMAGE

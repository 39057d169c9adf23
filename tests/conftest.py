"""Fixtures shared by all test areas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# qemu under TCG in every test (and the daemons they start): this machine's /dev/kvm opens but its nested KVM
# cannot run guests, and the auto probe would cost each verifying process up to 10 s to learn that again.
# tests/integration/test_qemu_accel.py exercises "auto" explicitly.
os.environ.setdefault("BOOTBACK_QEMU_ACCEL", "tcg")
# The operator's standing choice for `bootback init` in this suite (children inherit it): unencrypted, unless a test
# asks for --encryption aes-256-gcm (tests/integration/test_encrypted_repo_cli.py).
os.environ.setdefault("BOOTBACK_ENCRYPTION", "none")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep what a person may want to look at afterwards (screenshots, console logs)."""
    path = ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def build_cache() -> Path:
    """Built disks and images reused between test modules (and runs on the same machine)."""
    path = Path(os.environ.get("BOOTBACK_TEST_CACHE", "/var/tmp/bootback-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path

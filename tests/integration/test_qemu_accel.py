"""qemu's accelerator choice with the real qemu and this machine's /dev/kvm: a bad BOOTBACK_QEMU_ACCEL is one
clear error, a device that does not open means TCG without starting anything, and `auto` never hangs on a KVM
that cannot run the guest (here: nested KVM takes 5-20 s to run SeaBIOS, so the probe refuses it, and when it does
not, it fails on syslinux with "KVM internal error") but finishes under TCG and remembers that."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from appliance.demo import qemu
from appliance.demo.bootdisk import build_boot_disk
from appliance.errors import UsageError


def test_the_setting_is_checked_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qemu.ACCEL_ENV, "Warp")
    with pytest.raises(UsageError, match=r"BOOTBACK_QEMU_ACCEL: one of auto, kvm, tcg, got 'warp'"):
        qemu.accel_setting()
    monkeypatch.setenv(qemu.ACCEL_ENV, " TCG ")
    assert qemu.accel_setting() == "tcg"
    assert qemu.accel_setting("kvm") == "kvm"
    monkeypatch.delenv(qemu.ACCEL_ENV)
    assert qemu.accel_setting() == "auto"


def test_a_device_that_does_not_open_means_tcg_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    assert qemu.kvm_usable(str(tmp_path / "kvm")) is False
    assert time.monotonic() - started < 1


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_auto_never_hangs_on_a_kvm_that_cannot_run_the_guest(build_cache: Path, tmp_path: Path) -> None:
    try:
        os.close(os.open(qemu.KVM_DEVICE, os.O_RDWR))
    except OSError:
        pytest.skip("no usable /dev/kvm here: auto is TCG without a probe (the test above)")
    disk = tmp_path / "disk.raw"
    shutil.copyfile(build_boot_disk(build_cache).path, disk)
    started = time.monotonic()
    result = qemu.boot(str(disk), timeout=6, accel="auto")
    took = time.monotonic() - started
    # the probe (<= PROBE_SECONDS) plus at most the timeout: a paused KVM guest is not waited on
    assert took < qemu.PROBE_SECONDS + 6 + 5, took
    if result.accel == "tcg":  # KVM was refused: by the probe, or by the guest, and is not tried again
        assert qemu.kvm_usable() is False
        assert qemu.KVM_FAILED not in result.console, "the console is the TCG run's"
    else:  # a KVM that passed the probe and did not fail within the timeout
        assert qemu.KVM_FAILED not in result.console, result.console

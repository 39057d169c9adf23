"""How users build the image: `docker build .` in a fresh clone resolves everything from a package index (the
online path, here a real pypiserver on loopback serving the wheels built once on the host), and the offline path
(wheels/ in the context, scripts/build-image.sh) gives the same virtualenv. Both final images are lean: no pip,
setuptools, source tree, wheels or caches."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.daemon_process import ROOT, free_port

pytestmark = pytest.mark.slow
BASE = "bootback/base:bookworm"  # made by scripts/build-image.sh (mmdebstrap) for the appliance_image fixture


def run_in(image: str, script: str) -> str:
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{script!r} in {image}: {done.stdout}{done.stderr}"
    return done.stdout


def fresh_clone(dest: Path) -> Path:
    """The tracked files of this checkout as they are now: what `git clone` gives (no wheels/, no .venv)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert not (dest / "wheels").exists() and (dest / "Dockerfile").is_file()
    return dest


@pytest.fixture(scope="module")
def package_index(appliance_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A pypiserver on 127.0.0.1 serving the dependency wheels scripts/build-image.sh built for appliance_image,
    plus setuptools (the build backend), but not bootback itself: the builder must build that from source. No
    fallback to PyPI, so a package missing here fails the build."""
    base = tmp_path_factory.mktemp("index")
    packages = base / "packages"
    packages.mkdir()
    for wheel in (ROOT / "wheels").glob("*.whl"):
        if not wheel.name.startswith("bootback-"):
            shutil.copy2(wheel, packages)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    subprocess.run([*download, "setuptools>=77", "--dest", str(packages)], check=True, capture_output=True, timeout=300)
    port = free_port()
    log = base / "access.log"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "pypi-server"),
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-fallback",
            "--log-file",
            str(log),
            "-v",
            str(packages),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/simple/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "flask/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "pypiserver did not start"
            time.sleep(0.3)
        yield {"url": url, "log": log}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def online_image(package_index: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    context = fresh_clone(tmp_path_factory.mktemp("clone"))
    tag = f"bootback:test-online-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [
            "docker",
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={BASE}",
            "--build-arg",
            f"PIP_INDEX_URL={package_index['url']}",
            "-t",
            tag,
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    try:
        yield tag, done.stdout
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, timeout=120)


def site_packages(image: str) -> set[str]:
    return set(run_in(image, "ls /opt/bootback/lib/python3*/site-packages").split())


LEAN = (
    "test ! -e /opt/bootback/bin/pip && test ! -e /src && test ! -e /tmp/wheels && test ! -e /root/.cache/pip"
    " && ! ls -d /opt/bootback/lib/python3*/site-packages/setuptools /opt/bootback/lib/python3*/site-packages/pip"
    " 2>/dev/null"
    # no compilers or the demo's build tools (kernel, bootloader installers), no apt lists or package caches
    " && ! command -v gcc cc make syslinux mcopy 2>/dev/null && ! ls /boot/vmlinuz* 2>/dev/null"
    ' && test -z "$(find /var/lib/apt/lists /var/cache/apt -mindepth 1 -not -name lock -not -name partial 2>/dev/null)"'
)


def test_docker_build_in_a_fresh_clone_resolves_from_the_package_index(
    online_image: tuple[str, str], package_index: dict, appliance_image: str
) -> None:
    tag, output = online_image
    assert f"building wheels from {package_index['url']}" in output, output[-3000:]
    log = package_index["log"].read_text()
    # the builder really asked this index and downloaded from it: the build backend and a runtime dependency
    assert "/simple/setuptools/" in log and "/simple/flask/" in log, log[-3000:]
    assert "/packages/flask-" in log and "/packages/setuptools-" in log, log[-3000:]
    assert run_in(tag, "bootback --version").startswith("bootback")
    run_in(tag, LEAN)
    # the same virtualenv as the offline build from wheels/
    assert site_packages(tag) == site_packages(appliance_image)


def test_the_offline_image_is_lean_and_keeps_the_base(appliance_image: str) -> None:
    run_in(appliance_image, LEAN)
    assert any(n.startswith("bootback-") and n.endswith(".dist-info") for n in site_packages(appliance_image))

    def size(image: str) -> int:
        out = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=True
        ).stdout
        return int(out)

    # the venv (~115 MB), Debian's qemu and the labs' and item recovery's tools (~190 MB) and the demo repository
    # (~46 MB), nothing else: docs/benchmarks.md has the breakdown; the kernel package alone would add ~400 MB
    assert size(appliance_image) - size(BASE) < 400_000_000, (size(appliance_image), size(BASE))

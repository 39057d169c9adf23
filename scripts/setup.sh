#!/usr/bin/env bash
# Install what bootback and its tests need on a Debian 12 machine, idempotently:
# Debian packages (real NFS clients, qemu, Docker engine, Chromium ...), a Docker engine running,
# and a virtualenv in .venv with the project installed editable.
#   scripts/setup.sh          everything the tests need
#   scripts/setup.sh --demo   only what the demo needs (Python side)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}

apt_packages=(
  libnfs-utils rpcbind qemu-utils qemu-block-extra qemu-system-x86
  busybox-static linux-image-amd64 syslinux extlinux syslinux-common fdisk e2fsprogs
  docker.io mmdebstrap chromium fio
)
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"

if [ "$mode" != "--demo" ]; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # A Docker engine: start one if none answers.
  if ! docker info >/dev/null 2>&1; then
    echo "setup: starting dockerd"
    ($sudo dockerd >/tmp/bootback-dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start, see /tmp/bootback-dockerd.log" >&2; exit 1; }
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras="test,fleet"
[ "$mode" = "--demo" ] && extras="fleet"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi

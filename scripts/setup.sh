#!/usr/bin/env bash
# Install what bootback and its tests need on a Debian 12 machine, idempotently:
# Debian packages (real NFS clients, qemu, Docker engine, Chromium ...), a Docker engine running,
# and a virtualenv in .venv with the project installed editable.
#   scripts/setup.sh          everything the tests need
#   scripts/setup.sh --demo   only what the demo needs (its VM's boot tools, NFS clients, qemu; no Docker/Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}

apt_packages=(
  libnfs-utils rpcbind qemu-utils qemu-block-extra qemu-system-x86
  busybox-static linux-image-amd64 syslinux extlinux syslinux-common fdisk e2fsprogs
  docker.io docker-compose mmdebstrap chromium fio nftables
  golang-go golang-github-vmware-govmomi-dev dosfstools mtools ntfs-3g lvm2 xfsprogs
  postgresql-15 fuse3 mariadb-server mariadb-client slapd ldap-utils
  ceph-mon ceph-osd radosgw ceph-common
  cpio iproute2  # virtual labs: the test guests' initramfs; network namespaces, bridges, taps
)
demo_packages=(
  libnfs-utils qemu-utils qemu-block-extra qemu-system-x86
  busybox-static linux-image-amd64 syslinux syslinux-common mtools dosfstools fdisk e2fsprogs
)
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"

wanted=("${apt_packages[@]}")
[ "$mode" = "--demo" ] && wanted=("${demo_packages[@]}")
missing=()
for p in "${wanted[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$mode" != "--demo" ]; then
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
spec=".[test,fleet]"
[ "$mode" = "--demo" ] && spec="."
hash=$(sha256sum < pyproject.toml | cut -c1-16)
stamp=".venv/.installed-$hash-$(echo "$spec" | tr -dc 'a-z,')"
# A full install also satisfies the demo.
if [ ! -f "$stamp" ] && ! { [ "$mode" = "--demo" ] && [ -f ".venv/.installed-$hash-test,fleet" ]; }; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "$spec"
  touch "$stamp"
fi

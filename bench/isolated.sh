#!/usr/bin/env bash
# Run a benchmark in a private network namespace (its own loopback and port 111) with a private /run and
# ganesha state dir, so that the NFS servers other people start on this machine (tests, demos, ganesha)
# cannot register over ours in the portmapper, nor we over theirs. Needs root (unshare).
#   bench/isolated.sh speed --quick      = .venv/bin/python -m bench speed --quick, isolated
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BOOTBACK_BENCH_ISOLATED:-}" ]; then
  exec env BOOTBACK_BENCH_ISOLATED=1 unshare --net --mount --propagation private "$0" "$@"
fi
ip link set lo up
# glibc's getaddrinfo(AI_ADDRCONFIG) sees no IPv4 address when only 127.0.0.1 exists: ganesha then cannot
# resolve its Bind_addr 127.0.0.1. A private address on lo (this namespace only) fixes that.
ip addr add 10.254.254.1/32 dev lo
mount -t tmpfs tmpfs /run  # rpcbind's socket and lock files: the host's rpcbind (if any) stays unseen
mkdir -p /tmp/ganesha-anchor && mount -t tmpfs tmpfs /tmp/ganesha-anchor  # ganesha.sh's pid files
exec .venv/bin/python -m bench "$@"

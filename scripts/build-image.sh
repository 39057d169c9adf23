#!/usr/bin/env bash
# Build the appliance image without a registry:
#   1. a local Debian base image made with mmdebstrap (unless BASE_IMAGE names one that exists),
#   2. wheels of bootback and its dependencies built on this host (pip can reach PyPI here, not in docker build),
#   3. docker build with BASE_IMAGE as the build argument.
# usage: scripts/build-image.sh [TAG]      (default bootback:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-bootback:latest}
base=${BASE_IMAGE:-bootback/base:bookworm}

if ! docker image inspect "$base" >/dev/null 2>&1; then
  [ "$base" = "bootback/base:bookworm" ] || { echo "build-image: base image $base not found" >&2; exit 1; }
  echo "build-image: making $base with mmdebstrap" >&2
  mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates bookworm - | docker import - "$base"
fi

py=.venv/bin/python
[ -x "$py" ] || py=python3
mkdir -p wheels
rm -f wheels/bootback-*.whl
"$py" -m pip wheel --quiet --wheel-dir wheels --find-links wheels .
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! docker build --build-arg BASE_IMAGE="$base" -t "$tag" . >"$log" 2>&1; then
  tail -n 40 "$log" >&2  # the failing step's own output (e.g. the demo stage's), not only its exit code
  echo "build-image: docker build failed" >&2
  exit 1
fi
echo "build-image: built $tag on $base" >&2

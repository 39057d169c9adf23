# The bootback appliance: NFS datastore (portmapper 111, NFS 2049, MOUNT 1058) + admin page and API on 6161.
#
#   docker build -t bootback .                      # online: the builder stage resolves from a package index
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple/ -t bootback .
#   scripts/build-image.sh bootback:latest          # offline: wheels/ built on the host, local base image
#
# Three stages: the builder makes a virtualenv in /opt/bootback, either from a wheels/ directory in the context
# (when it holds a bootback wheel: the offline path, no index needed) or by `pip wheel .` from the index given by
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (default PyPI); the final stage copies only that virtualenv, without pip,
# setuptools, wheels or caches. BASE_IMAGE must provide python3 with the venv module (Debian: python3-venv);
# every stage uses it, so the virtualenv's interpreter links stay valid. The demo stage builds the demo
# repository (the same bootable VM as `./run demo`: Debian's kernel, busybox, syslinux) and the final stage
# copies only that repository, not the kernel package or the tools that built it. Debian packages come from
# the base image's apt sources (the Debian archive).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# No defaults: unset, pip uses its own configuration (PyPI).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# The context is the source tree (.dockerignore keeps only what the package needs) plus wheels/ when present:
# COPY cannot copy an optional directory, so the whole context comes in and RUN tests for wheels/.
COPY . /src
WORKDIR /src
RUN set -eu; \
    python3 -m venv /opt/bootback; \
    if ls wheels/bootback-*.whl >/dev/null 2>&1; then \
      echo "builder: installing from wheels/ (offline)"; \
      wheeldir=wheels; index="--no-index"; \
    else \
      echo "builder: building wheels from ${PIP_INDEX_URL:-the default index}"; \
      links=""; [ -d wheels ] && links="--find-links wheels"; \
      /opt/bootback/bin/pip wheel --no-cache-dir --disable-pip-version-check $links --wheel-dir /tmp/wheels .; \
      wheeldir=/tmp/wheels; index="--no-index"; \
    fi; \
    /opt/bootback/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile $index \
      --find-links "$wheeldir" bootback; \
    /opt/bootback/bin/pip uninstall --yes --quiet --disable-pip-version-check setuptools pip; \
    /opt/bootback/bin/python -m compileall -q /opt/bootback/lib

FROM ${BASE_IMAGE} AS demo
# The tools first, apart from the code: this layer stays cached while the code changes.
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends linux-image-amd64 busybox-static syslinux syslinux-common \
      mtools dosfstools e2fsprogs fdisk cpio >/dev/null
COPY --from=builder /opt/bootback /opt/bootback
# No loop device or root needed (appliance/demo/bootdisk.py), so this runs in an unprivileged build; cpio packs
# the demo-lab guests' initramfs (appliance/lab/guests.py).
# A demo that fell back to a data disk fails the build: the image promises the bootable one.
RUN set -eu; \
    out=$(BOOTBACK_BUILD_CACHE=/tmp/demo-build /opt/bootback/bin/bootback demo --prepare-only --data /opt/bootback-demo 2>&1); \
    echo "$out"; case "$out" in *"restore points, bootable"*) ;; *) echo "demo stage: the demo VM is not bootable" >&2; exit 1;; esac; \
    rm -rf /tmp/demo-build

FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="bootback" \
      org.opencontainers.image.description="Run virtual machines straight from backups over NFS" \
      org.opencontainers.image.licenses="Apache-2.0"

# What each use needs at run time (README, "The container"): qemu for backup verification (TCG, or KVM with
# --device /dev/kvm) with its nfs:// block driver (qemu-block-extra); iproute2, bridge, nftables and busybox (the
# lab segment's udhcpd, ping) for the virtual labs; e2fsprogs, xfsprogs and FUSE for item recovery. No recommends,
# no apt lists or caches.
# Documentation, manual pages and translations of these packages are not installed (copyright files are).
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; \
    printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
      'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/locale/*' 'path-exclude=/usr/share/info/*' \
      > /etc/dpkg/dpkg.cfg.d/bootback-lean; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-block-extra qemu-utils \
      iproute2 nftables busybox-static e2fsprogs xfsprogs fuse3 libfuse2 >/dev/null; \
    apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    useradd --system --uid 10001 --user-group --home-dir /var/lib/bootback --shell /usr/sbin/nologin bootback

ENV PATH=/opt/bootback/bin:$PATH \
    BOOTBACK_STATE=/var/lib/bootback \
    BOOTBACK_MIN_FREE=100G \
    BOOTBACK_DEMO_DIR=/var/lib/bootback-demo \
    PYTHONUNBUFFERED=1

COPY --from=builder /opt/bootback /opt/bootback
# `docker run ... bootback demo`: the prepared demo repository; its state is written beside it.
COPY --from=demo --chown=bootback:bootback /opt/bootback-demo /var/lib/bootback-demo
# Owned by the bootback user, so `--user bootback` works on fresh named volumes (they copy this ownership).
RUN mkdir -p /repositories /var/lib/bootback /cache /migrations \
    && chown bootback:bootback /var/lib/bootback /cache /migrations

# Repositories (read-only use is fine), session state (sessions, TLS certificate, logins), write caches.
# /migrations (migration targets) is not declared a volume: mount one there when migrating.
VOLUME ["/repositories", "/var/lib/bootback", "/cache"]
EXPOSE 111/tcp 111/udp 2049/tcp 2049/udp 1058/tcp 1058/udp 6161/tcp

# Runs as root by default: files NFS clients create keep the client's uid/gid only when the daemon may chown
# them (ESXi writes as root and expects root-owned files back), and labs (network namespaces, nftables) and item
# recovery (FUSE mounts) need root with --cap-add/--device (README). Docker's default capability set covers the
# datastore. The datastore, page and verification also run as `--user bootback` (uid 10001): it owns the state,
# cache and migration directories, and Docker lets any user bind 111 in a container's network namespace
# (net.ipv4.ip_unprivileged_port_start=0; not with --network host).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["bootback", "health"]
# The daemon is PID 1 and handles SIGTERM itself: sessions are flushed and instant ones come back at restart.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bootback"]
CMD ["serve", "--repo-dir", "/repositories", "--cache-dir", "/cache"]

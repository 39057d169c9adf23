# The bootback appliance: NFS datastore (portmapper 111, NFS 2049, MOUNT 1058) + admin page and API on 6161.
#
#   docker build -t bootback .                      # online: the builder stage resolves from a package index
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple/ -t bootback .
#   scripts/build-image.sh bootback:latest          # offline: wheels/ built on the host, local base image
#
# Two stages: the builder makes a virtualenv in /opt/bootback, either from a wheels/ directory in the context
# (when it holds a bootback wheel: the offline path, no index needed) or by `pip wheel .` from the index given by
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (default PyPI); the final stage copies only that virtualenv, without pip,
# setuptools, wheels or caches. BASE_IMAGE must provide python3 with the venv module (Debian: python3-venv);
# both stages use it, so the virtualenv's interpreter links stay valid.
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

FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="bootback" \
      org.opencontainers.image.description="Run virtual machines straight from backups over NFS" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/bootback/bin:$PATH \
    BOOTBACK_STATE=/var/lib/bootback \
    BOOTBACK_MIN_FREE=100G \
    PYTHONUNBUFFERED=1

COPY --from=builder /opt/bootback /opt/bootback
RUN mkdir -p /repositories /var/lib/bootback /cache /migrations

# Repositories (read-only use is fine), session state (sessions, TLS certificate, logins), write caches.
# /migrations (migration targets) is not declared a volume: mount one there when migrating.
VOLUME ["/repositories", "/var/lib/bootback", "/cache"]
EXPOSE 111/tcp 111/udp 2049/tcp 2049/udp 1058/tcp 1058/udp 6161/tcp

# Runs as root, on purpose: the NFS server stores files that clients create with the client's uid/gid (ESXi
# writes as root and expects root-owned files back), which takes chown of arbitrary owners (CAP_CHOWN,
# CAP_FOWNER, CAP_DAC_OVERRIDE on the cache), and the portmapper listens on 111 (CAP_NET_BIND_SERVICE).
# Docker's default capability set for root already holds these (no --privileged, no --cap-add needed).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["bootback", "health"]
# The daemon is PID 1 and handles SIGTERM itself: sessions are flushed and instant ones come back at restart.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bootback"]
CMD ["serve", "--repo-dir", "/repositories", "--cache-dir", "/cache"]

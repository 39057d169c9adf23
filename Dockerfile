# The bootback appliance: NFS datastore (portmapper 111, NFS 2049, MOUNT 1058) + admin page and API on 6161.
# Built offline: the project and its dependencies come as wheels built on the host (scripts/build-image.sh),
# and the base image is a build argument, since no registry may be reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="bootback" \
      org.opencontainers.image.description="Run virtual machines straight from backups over NFS" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/bootback/bin:$PATH \
    BOOTBACK_STATE=/var/lib/bootback \
    BOOTBACK_MIN_FREE=100G \
    PYTHONUNBUFFERED=1

COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/bootback \
 && /opt/bootback/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir --no-compile bootback \
 && /opt/bootback/bin/python -m compileall -q /opt/bootback/lib \
 && rm -rf /tmp/wheels \
 && mkdir -p /repositories /var/lib/bootback /cache

# Repositories (read-only use is fine), session state (sessions, TLS certificate, logins), write caches.
VOLUME ["/repositories", "/var/lib/bootback", "/cache"]
EXPOSE 111/tcp 111/udp 2049/tcp 2049/udp 1058/tcp 1058/udp 6161/tcp

HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["bootback", "health"]
# The daemon is PID 1 and handles SIGTERM itself: sessions are flushed and instant ones come back at restart.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bootback"]
CMD ["serve", "--repo-dir", "/repositories", "--cache-dir", "/cache"]

# syntax=docker/dockerfile:1
#
# relay container image: build a wheel, install it with its dependencies into a
# virtualenv, copy only that virtualenv into a clean runtime stage.
#
#   docker build -t relay:0.1.0 .
#   docker run --rm -v "$PWD/rules:/etc/relay/rules:ro" -v relay-state:/var/lib/relay \
#     -v /srv/landing:/data -p 9464:9464 relay:0.1.0
#
# The base tag is pinned to an exact Python patch release and Debian release.
# For production builds pin the digest too (python:3.11.14-slim-bookworm@sha256:...);
# see docs/deploy.md.

ARG PYTHON_BASE=python:3.11.14-slim-bookworm

# --- builder: wheel + virtualenv ------------------------------------------------------
FROM ${PYTHON_BASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Only what the build needs; .dockerignore keeps everything else (and any key
# material lying around the work tree) out of the build context.
COPY pyproject.toml README.md ./
COPY relay ./relay

RUN python -m venv /opt/relay \
    && python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/relay/bin/pip install /wheels/relay-*.whl \
    && /opt/relay/bin/python -m compileall -q /opt/relay/lib

# --- runtime ----------------------------------------------------------------------------
FROM ${PYTHON_BASE}

LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="Watches landing-zone folders and forwards complete files to destinations" \
      org.opencontainers.image.licenses="Apache-2.0"

# OpenSSH's client, for SFTP destinations with `transport: openssh` (docs/sftp.md). The
# version is pinned to Debian 12's series; the glob takes its security updates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'openssh-client=1:9.2p1-2+deb12u*' \
    && rm -rf /var/lib/apt/lists/*

# A passwd entry for the fixed UID so libraries that look up the home directory
# work; no login shell, no home directory contents. Data and state directories
# are owned by that UID; rules stay root-owned (read-only to relay).
RUN groupadd --system --gid 10001 relay \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /var/lib/relay --no-create-home --shell /usr/sbin/nologin relay \
    && mkdir -p /etc/relay/rules /etc/relay/ssh /var/lib/relay /data /run/secrets/relay \
    && chown 10001:10001 /var/lib/relay /data \
    && chmod 0750 /var/lib/relay

COPY --from=builder /opt/relay /opt/relay

ENV PATH="/opt/relay/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_RULES=/etc/relay/rules \
    RELAY_JOURNAL=/var/lib/relay/journal.sqlite3 \
    RELAY_LOG_FORMAT=json \
    RELAY_LOG_LEVEL=info \
    RELAY_METRICS_ADDR=0.0.0.0:9464 \
    RELAY_CONCURRENCY=48

VOLUME ["/etc/relay/rules", "/var/lib/relay", "/data"]

EXPOSE 9464

USER 10001:10001

WORKDIR /var/lib/relay

# No shell and no curl: python asks /healthz on the port RELAY_METRICS_ADDR names,
# and passes when the operator disabled the HTTP endpoint (RELAY_METRICS_ADDR="").
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; a=os.environ.get('RELAY_METRICS_ADDR','0.0.0.0:9464'); h,_,p=a.rpartition(':'); h=h.strip('[]'); h='127.0.0.1' if h in ('','0.0.0.0','::') else h; h='['+h+']' if ':' in h else h; sys.exit(0 if not a or u.urlopen('http://%s:%s/healthz' % (h,p), timeout=3).status==200 else 1)"]

ENTRYPOINT ["relay"]
CMD ["run"]

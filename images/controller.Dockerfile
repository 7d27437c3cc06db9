# syntax=docker/dockerfile:1
# The controller: Kubernetes source, identities, CA, config stream, flow relay.
# No bcc here: this image loads no eBPF, so it starts from plain Debian.
# Build (context = repository root): images/build.sh, or
#   docker build -f images/controller.Dockerfile -t ghcr.io/shoal-mesh/shoal-controller:0.1.0 .
# BASE: any Debian bookworm image. `make images` passes the local debootstrapped
# shoal-base:bookworm (never pulled); docker/BuildKit elsewhere use the default.
# BUILD_BASE: the build stage's base (make images adds the machine's CA bundle there, for pip).
ARG BASE=debian:bookworm-slim
ARG BUILD_BASE=${BASE}

FROM ${BUILD_BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY shoal/ shoal/
COPY agent/ agent/
COPY controller/ controller/
COPY waypoint/ waypoint/
COPY perf/ perf/
COPY bpf/ bpf/
# The controller carries no data path: mypyc's compiled modules (setup.py) are not built here.
ENV SHOAL_COMPILE=0
RUN python3 -m venv /opt/shoal \
 && /opt/shoal/bin/pip install --no-cache-dir --no-compile /src \
 && /opt/shoal/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc /usr/share/man \
 && groupadd --gid 1337 shoal && useradd --uid 1337 --gid 1337 --no-create-home shoal
COPY --from=build /opt/shoal /opt/shoal
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="shoal-controller" \
      org.opencontainers.image.source="https://github.com/shoal-mesh/shoal"
USER 1337:1337
CMD ["python", "-m", "shoal.controller"]

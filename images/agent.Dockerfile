# syntax=docker/dockerfile:1
# The per-node image: the agent (python -m shoal.agent) and the node proxy
# (python -m shoal.agent.ztunnel) run from it, as two containers of one pod.
# Build (context = repository root): images/build.sh, or
#   docker build -f images/agent.Dockerfile -t ghcr.io/shoal-mesh/shoal-agent:0.1.0 .
# BCC_BASE: images/base.Dockerfile. BASE/BUILD_BASE: as in controller.Dockerfile.
ARG BCC_BASE=ghcr.io/shoal-mesh/shoal-bcc-base:0.1.0
ARG BASE=debian:bookworm-slim
ARG BUILD_BASE=${BASE}

FROM ${BUILD_BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    gcc python3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY shoal/ shoal/
COPY agent/ agent/
COPY controller/ controller/
COPY waypoint/ waypoint/
COPY perf/ perf/
COPY bpf/ bpf/
# --system-site-packages: bcc comes from the base image's python3-bpfcc (the PyPI
# package called "bcc" is unrelated).
# gcc, python3-dev: pip builds the compiled hot-path modules (mypyc, setup.py); the runtime
# stage copies the venv with them and gets no compiler.
RUN python3 -m venv --system-site-packages /opt/shoal \
 && /opt/shoal/bin/pip install --no-cache-dir --no-compile /src \
 && /opt/shoal/bin/pip uninstall -q -y pip setuptools

FROM ${BCC_BASE}
# iproute2: the node proxy installs each pod's delivery rules with `ip -batch` (both families).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc /usr/share/man
COPY --from=build /opt/shoal /opt/shoal
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="shoal-agent" \
      org.opencontainers.image.source="https://github.com/shoal-mesh/shoal"
# Root with a small capability set (see daemonset/agent.yaml): bpf(), setns() and
# the host's /proc need uid 0 plus the capabilities, never privileged mode.
USER 0
CMD ["python", "-m", "shoal.agent"]

# syntax=docker/dockerfile:1
# The bcc runtime every eBPF-loading image starts from: Debian's libbcc (with its
# embedded clang/LLVM, which compiles the programs on the node against the host's
# kernel headers, mounted at /lib/modules and /usr/src) and its Python bindings.
# Build: docker build -f images/base.Dockerfile -t ghcr.io/shoal-mesh/shoal-bcc-base:0.1.0 .
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc libbpfcc ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc /usr/share/man
LABEL org.opencontainers.image.title="shoal-bcc-base" \
      org.opencontainers.image.source="https://github.com/shoal-mesh/shoal"

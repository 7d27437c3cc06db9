#!/usr/bin/env bash
# Builds Shoal's images with docker or another BuildKit front end, from debian:bookworm-slim.
# On the development machines, `make images` (images/build-local.sh) builds the same
# Dockerfiles with buildah on a debootstrapped base instead, never pulling.
# Usage: images/build.sh [HUB] [TAG]   e.g. images/build.sh ghcr.io/me 0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
HUB=${1:-ghcr.io/shoal-mesh}
TAG=${2:-0.1.0}
DOCKER=${DOCKER:-docker}
"$DOCKER" build -f images/base.Dockerfile -t "$HUB/shoal-bcc-base:$TAG" .
"$DOCKER" build -f images/agent.Dockerfile --build-arg "BCC_BASE=$HUB/shoal-bcc-base:$TAG" -t "$HUB/shoal-agent:$TAG" .
"$DOCKER" build -f images/controller.Dockerfile -t "$HUB/shoal-controller:$TAG" .
"$DOCKER" build -f images/waypoint.Dockerfile -t "$HUB/shoal-waypoint:$TAG" .
echo "then: shoal install --hub $HUB --image-tag $TAG"

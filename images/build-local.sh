#!/usr/bin/env bash
# `make images`: builds shoal-controller, shoal-agent and shoal-waypoint with buildah from
# the same Dockerfiles docker/BuildKit use elsewhere (images/*.Dockerfile), never pulling
# from a container registry:
#   1. a Debian bookworm root filesystem made once by debootstrap from the machine's apt
#      mirror, cached as a tarball under $SHOAL_IMAGE_STATE (/var/lib/shoal/images), is
#      imported as shoal-base:bookworm: every stage's BASE;
#   2. shoal-build-base:bookworm = that base + this machine's extra CA certificates, for the
#      build stages only (pip reaches PyPI through the machine's egress CA); the images
#      that ship never carry it;
#   3. the four Dockerfiles, each tagged both shoal-X:TAG and HUB/shoal-X:TAG, the name
#      `shoal install --render` writes into the manifests (so --containers runs exactly it).
# Usage: images/build-local.sh [--dry-run]   (env: HUB, TAG, SHOAL_IMAGE_STATE)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=""
[ "${1:-}" = --dry-run ] && DRY=echo
STATE=${SHOAL_IMAGE_STATE:-/var/lib/shoal/images}
PY=${PYTHON:-.venv/bin/python}
HUB=${HUB:-$("$PY" -c 'from shoal.cli.deploy.render import DEFAULT_HUB; print(DEFAULT_HUB)')}
TAG=${TAG:-$("$PY" -c 'from shoal.cli.deploy.render import DEFAULT_TAG; print(DEFAULT_TAG)')}
BASE=localhost/shoal-base:bookworm
BUILD_BASE=localhost/shoal-build-base:bookworm
# runc + cgroupfs: crun refuses this machine's hybrid cgroup layout. Host network for RUN
# steps: the build creates no bridge and touches nothing in the root network namespace.
BUILDAH=(buildah --cgroup-manager cgroupfs)
# Explicit ulimits: the caller's hard nofile; nproc 4096 (runc is refused higher values here).
NOFILE=$(ulimit -Hn); NPROC=4096
BUD=(bud --runtime runc --network host --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC" --layers)

log() { printf '\033[1m[images]\033[0m %s\n' "$*"; }

mirror() {
  # The first deb.debian.org-style URI of the machine's apt sources (deb822 or one-line).
  { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
    grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'
  } | grep -v security | head -n1 || true
}

base_image() {
  if [ -z "$DRY" ] && buildah inspect --type image "$BASE" >/dev/null 2>&1; then return; fi
  local tarball="$STATE/bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    local url rootfs
    url=$(mirror)
    rootfs="$STATE/rootfs.tmp"
    log "debootstrap --variant=minbase bookworm from ${url:-?} (once; cached in $tarball)"
    $DRY mkdir -p "$STATE"
    $DRY rm -rf "$rootfs"
    $DRY debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$url"
    # The same apt sources as this machine, so a build's apt-get sees the same mirror.
    $DRY cp -a /etc/apt/sources.list.d/. "$rootfs/etc/apt/sources.list.d/"
    [ -e /etc/apt/sources.list ] && $DRY cp /etc/apt/sources.list "$rootfs/etc/apt/sources.list"
    $DRY rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info
    if [ -z "$DRY" ]; then tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"; fi
    $DRY rm -rf "$rootfs"
  fi
  log "importing $tarball as $BASE"
  if [ -n "$DRY" ]; then echo podman import "$tarball" "$BASE"; return; fi
  podman --cgroup-manager cgroupfs import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
}

build_base_image() {
  local ctr
  if [ -n "$DRY" ]; then echo buildah from "$BASE" '+' /usr/local/share/ca-certificates; return; fi
  # Kept once made: a new image ID here would void every build stage's layer cache.
  buildah inspect --type image "$BUILD_BASE" >/dev/null 2>&1 && return
  ctr=$("${BUILDAH[@]}" from --pull=never "$BASE")
  # Removed whatever happens next: no working container is left behind.
  trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' RETURN
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    "${BUILDAH[@]}" copy "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
    "${BUILDAH[@]}" run --runtime runc --network host "$ctr" -- update-ca-certificates >/dev/null
  fi
  "${BUILDAH[@]}" config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$ctr"
  "${BUILDAH[@]}" commit -q --rm "$ctr" "$BUILD_BASE" >/dev/null
}

bud() {  # bud DOCKERFILE NAME [extra build args...]
  local file=$1 name=$2; shift 2
  log "building $name:$TAG from $file"
  $DRY "${BUILDAH[@]}" "${BUD[@]}" --pull=never -f "$file" \
    --build-arg "BASE=$BASE" --build-arg "BUILD_BASE=$BUILD_BASE" "$@" \
    -t "localhost/$name:$TAG" -t "$HUB/$name:$TAG" .
}

base_image
build_base_image
bud images/base.Dockerfile shoal-bcc-base
bud images/agent.Dockerfile shoal-agent --build-arg "BCC_BASE=localhost/shoal-bcc-base:$TAG"
bud images/controller.Dockerfile shoal-controller
bud images/waypoint.Dockerfile shoal-waypoint
# The build stages' layers stay as untagged images: they are the --layers cache that makes
# the next `make images` rebuild only what changed. `buildah rmi --prune` reclaims them.
[ -n "$DRY" ] || podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^localhost/shoal-" | sort

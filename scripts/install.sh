#!/usr/bin/env bash
# Installs what Shoal needs on a Debian 12 machine, idempotently:
# apt packages, the kernel-headers wiring bcc needs, bpffs, and the project venv.
# Touches nothing in the root network namespace.
#   --perf  also the real clients and servers of the benchmarks (redis, postgresql; `make bench`),
#           installed without starting their system-wide services.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
APT_PACKAGES=(python3-bpfcc libbpfcc bpfcc-tools linux-headers-amd64 iproute2
              iperf3 sockperf stunnel4 haproxy wrk nghttp2-client socat tcpdump bpftool curl
              iptables nftables chromium
              openjdk-17-jdk-headless nodejs   # real-client tests: a Java (javac + JRE) and a Node.js client
              gcc python3-dev)   # mypyc compiles the hot-path modules at install (setup.py)

PERF_PACKAGES=(redis-server redis-tools postgresql postgresql-contrib)
# `--images` (make images) adds the image tools: buildah builds, podman runs (with runc: crun
# refuses this machine's hybrid cgroup layout), debootstrap makes the base root filesystem
# from the Debian mirror (no container registry is ever pulled).
IMAGE_PACKAGES=(buildah podman runc debootstrap)
WITH_PERF=0
WITH_IMAGES=0
for arg in "$@"; do
  case "$arg" in
    --perf) WITH_PERF=1 ;;
    --images) WITH_IMAGES=1 ;;
    *) echo "install: unknown option $arg (known: --perf, --images)" >&2; exit 2 ;;
  esac
done
if [ "$WITH_IMAGES" = 1 ]; then
  APT_PACKAGES+=("${IMAGE_PACKAGES[@]}")
fi

log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "install: must run as root (apt, bpffs and network namespaces need it)" >&2
  exit 1
fi

missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

apt_install() {
  log "apt: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# The benchmark servers run inside pods, started by the scenarios. Debian's postinst would
# start redis and postgres system-wide: a policy-rc.d that refuses (101) keeps them down,
# and anything that started anyway is stopped by its PID file.
perf_install() {
  local policy=/usr/sbin/policy-rc.d made_policy=0 pidfile
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  apt_install "$@" || { [ "$made_policy" = 0 ] || rm -f "$policy"; return 1; }
  [ "$made_policy" = 0 ] || rm -f "$policy"
  for pidfile in /run/redis/redis-server.pid /run/postgresql/*.pid; do
    [ -s "$pidfile" ] || continue
    log "stopping the system-wide service of $pidfile (benchmarks start their own in pods)"
    kill "$(head -n1 "$pidfile")" 2>/dev/null || true
  done
}

mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
if [ "$WITH_PERF" = 1 ]; then
  mapfile -t missing < <(missing_packages "${PERF_PACKAGES[@]}")
  [ ${#missing[@]} -eq 0 ] || perf_install "${missing[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/build. This kernel ships no headers
# package of its own, so point build/ and source/ at Debian's newest headers.
krel=$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
if [ -n "$hdr" ] && [ ! -e "/lib/modules/$krel/build" ]; then
  log "linking /lib/modules/$krel/build -> $hdr"
  mkdir -p "/lib/modules/$krel"
  ln -sfn "$hdr" "/lib/modules/$krel/build"
  ln -sfn "$common" "/lib/modules/$krel/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# bcc is pure Python over ctypes (libbcc.so from Debian); make Debian's copy importable.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

# Reinstall when what decides the install changes (dependencies, package mapping, this script),
# or a module compiled at install (pyproject's [tool.shoal] compiled) changed: its extension
# is rebuilt from the new source.
compiled=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["shoal"]["compiled"]))')
stamp="$VENV/.installed-$(cat pyproject.toml setup.py scripts/install.sh $compiled | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  log "pip: installing shoal and its dependencies"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # playwright drives Debian's chromium (tests/ui): never let it download a browser of its own.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/pip" install -q -e '.[test,otel]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
log "ready: $VENV/bin/shoal"

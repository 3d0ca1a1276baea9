#!/usr/bin/env bash
# Builds the visionlab Docker image: bash scripts/build-image.sh   (env: IMAGE=visionlab BASE_IMAGE=python:3.11-slim-bookworm)
#
# Works where no image registry is reachable (air-gapped clusters, these build machines): when BASE_IMAGE can be
# neither found locally nor pulled, an equivalent Debian 12 / Python 3.11 base is made from the host's Debian mirror
# with debootstrap (once; it is kept as visionlab-base:bookworm). The host's pip configuration (index URLs,
# find-links) and CA bundle reach `pip` inside the build as BuildKit secrets, so nothing of them is left in the
# image; local `file://` indexes and find-links folders are served read-only on 127.0.0.1 for the build's duration
# (the build uses --network host). Layers are cached by the Docker engine: a code change rebuilds only the last one.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-visionlab}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=visionlab-base:bookworm-slim  # the name says which make_base made it: a change here renames it
# Debian's docker.io client has BuildKit built in; a newer CLI without the buildx plugin refuses DOCKER_BUILDKIT=1.
DOCKER=${DOCKER:-docker}
if ! $DOCKER buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
export DOCKER_BUILDKIT=1

work=$(mktemp -d)
cleanup() {  # the loopback file servers started below, by pid
  if [ -f "$work/servers" ]; then while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$work/servers"; fi
  rm -rf "$work"
}
trap cleanup EXIT

debian_mirror() {  # the first http(s) Debian mirror apt uses on this host
  grep -h -o -E '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}' | grep -v -- '-security' | grep -E '^https?://' | head -n 1 || true
}

make_base() {  # a stand-in for python:3.11-slim-bookworm: Debian 12 minbase + python3 (3.11), venv, CA certificates
  command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap
  local root="$work/rootfs" mirror
  mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
  echo "build-image: making $LOCAL_BASE from $mirror with debootstrap" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
  # the image's apt reaches the same mirror (security updates included when the host lists them)
  echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
  # what Debian's own -slim images do: no manuals, docs (copyrights stay) or translations from any later apt-get
  # install, and apt keeps no downloaded .deb files; the same paths are emptied in the base itself
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' 'path-exclude /usr/share/man/*' \
    'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    'path-exclude /usr/share/lintian/*' > "$root/etc/dpkg/dpkg.cfg.d/visionlab-slim"
  printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
    'Binary::apt::APT::Keep-Downloaded-Packages "false";' > "$root/etc/apt/apt.conf.d/visionlab-clean"
  find "$root"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | $DOCKER import -c 'ENV LANG=C.UTF-8' - "$LOCAL_BASE" >/dev/null
  rm -rf "$root"
}

if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! timeout 60 $DOCKER pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "build-image: $BASE_IMAGE is not available (no registry?); using $LOCAL_BASE" >&2
  BASE_IMAGE=$LOCAL_BASE
  $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1 || make_base
fi
[ "${BASE_ONLY:-0}" = 1 ] && exit 0

# --- pip settings for the build: the host's, with local folders served over loopback HTTP -----------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve() {  # serve() DIR -> http://127.0.0.1:PORT (a read-only file server for the build's duration)
  local port; port=$(free_port)
  python3 -m http.server --bind 127.0.0.1 --directory "$1" "$port" >/dev/null 2>&1 &
  echo $! >> "$work/servers"
  for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break; sleep 0.1; done
  echo "http://127.0.0.1:$port"
}
localize() {  # a file:// URL or a path -> an http URL over loopback; other URLs unchanged
  local url=$1 path
  case "$url" in file://*) path=${url#file://} ;; /*) path=$url ;; *) echo "$url"; return ;; esac
  [ -e "$path" ] || return 0
  if [ "$(basename "$path")" = simple ]; then echo "$(serve "$(dirname "$path")")/simple"; else echo "$(serve "$path")/"; fi
}
declare -A conf=()  # key -> value; pip lists environment settings (:env:) first, and they take precedence
while IFS= read -r line; do  # e.g.  global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
  key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  [ -n "${conf[$key]+set}" ] || conf[$key]=$value
done < <(python3 -m pip config list 2>/dev/null | sort -u)
{
  echo "[global]"
  for key in index-url extra-index-url find-links; do
    [ -n "${conf[$key]+set}" ] || continue
    urls=""; for u in ${conf[$key]}; do urls="$urls $(localize "$u")"; done
    echo "$key =$urls"
  done
  for key in trusted-host default-timeout retries timeout proxy; do
    [ -z "${conf[$key]+set}" ] || echo "$key = ${conf[$key]}"
  done  # constraint files are not needed: the lock files pin every package
  echo "cert = /run/secrets/ca"
} > "$work/pip.conf"
cert=${conf[cert]:-}
cert=${cert:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$cert" ] || cert=/dev/null

$DOCKER build --network host --progress "${PROGRESS:-plain}" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --secret id=pipconf,src="$work/pip.conf" --secret id=ca,src="$cert" \
  -t "$IMAGE" "$@" .

# Sourced by the scripts in scripts/image/: the container engine, its flags, and
# the values the Dockerfile's ARGs default to.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DOCKERFILE="$ROOT/Dockerfile"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "$*"; exit 1; }

# The default of an ARG in the Dockerfile (`ARG NAME=VALUE`): one source of truth.
dockerfile_arg() {
  sed -n "s/^ARG $1=\(.*\)$/\1/p" "$DOCKERFILE" | head -n 1
}

RUST_VERSION=${RUST_VERSION:-$(dockerfile_arg RUST_VERSION)}
DEBIAN_SUITE=${DEBIAN_SUITE:-$(dockerfile_arg DEBIAN_SUITE)}
# The names the Dockerfile's FROM lines resolve to (Docker Hub's official images).
RUST_IMAGE="docker.io/library/rust:${RUST_VERSION}-${DEBIAN_SUITE}"
DEBIAN_IMAGE="docker.io/library/debian:${DEBIAN_SUITE}-slim"

# podman, buildah and runc from Debian when missing (the scripts run as root).
ensure_tools() {
  local missing=()
  local tool
  for tool in podman buildah runc "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]})"
  log "installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Flags for `podman run` and `podman build` that let a container start on this
# host: podman's defaults first; then runc instead of crun (crun refuses hosts
# with hybrid cgroup v1/v2 hierarchies); then also file and process limits
# within the host's hard limits (podman's defaults may exceed them). The first
# set under which `true` runs in IMAGE (any image with /bin/true) wins; PODMAN_FLAGS overrides the probe.
# Call it once and keep the answer: each call starts containers.
podman_flags() {
  local image=$1
  if [ -n "${PODMAN_FLAGS+set}" ]; then
    echo "$PODMAN_FLAGS"
    return 0
  fi
  local flags
  for flags in "" "--runtime runc" \
      "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"; do
    # shellcheck disable=SC2086
    if podman run --rm --pull=never --network=none --entrypoint true $flags "$image" >/dev/null 2>&1; then
      echo "$flags"
      return 0
    fi
  done
  die "no container starts here from $image, with any of podman's defaults, --runtime runc, or lower ulimits: see 'podman run --rm --entrypoint true $image'"
}

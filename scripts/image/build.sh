#!/usr/bin/env bash
# `make image`: builds the container image from the Dockerfile with podman
# (buildah), as splitserve:<appVersion>-<VARIANT>, the tag the Helm chart's
# default values expect. The base images come from scripts/image/base-images.sh
# (pulled, or bootstrapped locally where no registry is reachable); the build
# itself never pulls. Settings (environment):
#   VARIANT=cpu|cuda       default cpu
#   IMAGE=NAME:TAG         default splitserve:<Chart.yaml appVersion>-<VARIANT>
#   BUILD_CA=FILE          PEM CAs that pip and cargo trust during the build
#                          (build secret build_ca); default: this host's CA
#                          bundle, so the build trusts what the host trusts;
#                          BUILD_CA= (empty) passes none
#   TORCH_INDEX_URL=URL    an index with the CPU-only torch wheel (Dockerfile)
#   BUILD_FLAGS="..."      more `podman build` flags (e.g. --no-cache)
#   MIN_FREE_GB=N          free space the build needs where podman stores
#                          images and writes layers (default 30)
set -euo pipefail
# shellcheck source=scripts/image/common.sh
source "$(dirname "$0")/common.sh"
cd "$ROOT"

VARIANT=${VARIANT:-cpu}
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' helm/splitserve/Chart.yaml)
IMAGE=${IMAGE:-splitserve:${APP_VERSION}-${VARIANT}}

bash scripts/image/base-images.sh

# The builder step holds the torch venv, cargo's target and the staged
# libraries (about 15 GB as an image) and the runtime layer is written twice
# while it is committed: a full disk fails the build late, so check first.
MIN_FREE_GB=${MIN_FREE_GB:-30}
for dir in "$(podman info --format '{{.Store.GraphRoot}}')" "${TMPDIR:-/var/tmp}"; do
  free_gb=$(( $(df --output=avail -k "$dir" | tail -n 1) / 1024 / 1024 ))
  if [ "$free_gb" -lt "$MIN_FREE_GB" ]; then
    echo "make image: $dir has $free_gb GB free; the build needs about $MIN_FREE_GB GB" \
         "(podman images; podman rmi IMAGE, or podman image prune, frees space)" >&2
    exit 1
  fi
done

args=(--pull=never --format docker --layers
      --build-arg VARIANT="$VARIANT"
      --build-arg RUST_VERSION="$RUST_VERSION"
      --build-arg DEBIAN_SUITE="$DEBIAN_SUITE"
      --file Dockerfile --tag "$IMAGE")
[ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL")
BUILD_CA=${BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
if [ -n "$BUILD_CA" ] && [ -f "$BUILD_CA" ]; then
  args+=(--secret "id=build_ca,src=$BUILD_CA")
fi

flags=$(podman_flags "$DEBIAN_IMAGE")
log "podman build ${flags:+$flags }-t $IMAGE (VARIANT=$VARIANT)"
start=$(date +%s)
# shellcheck disable=SC2086
podman build $flags "${args[@]}" ${BUILD_FLAGS:-} .
took=$(( $(date +%s) - start ))

# What a rebuild leaves behind, untagged: the image it replaced, and the
# builder's previous last step (several GB: it holds the staged libraries).
# Only this Dockerfile's own; the newest builder step stays as the layer cache.
podman image prune -f --filter "label=org.opencontainers.image.title=splitserve" >/dev/null || true
old_builders=$(
  for id in $(podman images --quiet --no-trunc --filter dangling=true); do
    step=$(podman history --no-trunc --format '{{.CreatedBy}}' "$id" | head -n 1)
    case "$step" in
      *"VARIANT=$VARIANT "*splitserve-target*)
        echo "$(podman image inspect --format '{{.Created.Unix}}' "$id") $id" ;;
    esac
  done | sort -rn | tail -n +2 | cut -d' ' -f2
)
# shellcheck disable=SC2086
[ -z "$old_builders" ] || podman rmi $old_builders >/dev/null || true

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${took}s: $(numfmt --to=iec --suffix=B "$size") ($size bytes)"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-160 >&2

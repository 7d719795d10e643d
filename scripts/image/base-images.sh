#!/usr/bin/env bash
# Puts the two images the Dockerfile starts FROM into podman's local storage,
# under the names its FROM lines resolve to:
#
#   docker.io/library/rust:<RUST_VERSION>-<DEBIAN_SUITE>   (builder stage)
#   docker.io/library/debian:<DEBIAN_SUITE>-slim           (runtime stage)
#
# Where a registry is reachable they are Docker Hub's official images, pulled.
# Where none is (an offline or mirror-only build host), they are made here:
#   debian:<suite>-slim  debootstrap --variant=minbase from the Debian mirror
#                        that apt uses, trimmed like the official slim image
#                        (no man pages, docs or locales) and imported;
#   rust:<v>-<suite>     that image plus Debian's C/C++ toolchain and this
#                        host's Rust toolchain (scripts/image/rust.Containerfile),
#                        which must be release <v>.
# Images already present are kept. Settings (environment):
#   BASE_IMAGES=auto|pull|bootstrap  auto (default): pull, and bootstrap if that fails
#   BASE_IMAGES_REFRESH=1            make or pull them again even when present
#   DEBIAN_MIRROR=URL                mirror for debootstrap (default: apt's own)
#   RUST_VERSION, DEBIAN_SUITE       default: the Dockerfile's ARGs
set -euo pipefail
# shellcheck source=scripts/image/common.sh
source "$(dirname "$0")/common.sh"

MODE=${BASE_IMAGES:-auto}
case "$MODE" in auto|pull|bootstrap) ;; *) die "BASE_IMAGES=$MODE: want auto, pull or bootstrap" ;; esac

ensure_tools

present() { podman image exists "$1"; }

if [ "${BASE_IMAGES_REFRESH:-0}" != 1 ] && present "$DEBIAN_IMAGE" && present "$RUST_IMAGE"; then
  log "base images present: $RUST_IMAGE, $DEBIAN_IMAGE"
  exit 0
fi

# ------------------------------------------------------------------ pull
pull() {
  local image
  for image in "$DEBIAN_IMAGE" "$RUST_IMAGE"; do
    log "pulling $image"
    timeout "${PULL_TIMEOUT:-1800}" podman pull "$image" || return 1
  done
}

if [ "$MODE" != bootstrap ]; then
  if pull; then
    log "base images pulled: $RUST_IMAGE, $DEBIAN_IMAGE"
    exit 0
  fi
  [ "$MODE" = pull ] && die "could not pull the base images (BASE_IMAGES=pull)"
  log "no registry reachable: bootstrapping the base images locally"
fi

# ------------------------------------------------------------- bootstrap
ensure_tools debootstrap

# The Debian archive URI apt uses (deb822 .sources or one-line .list), and the
# security archive beside it, if apt has one.
apt_uri() {
  local want=$1  # regex the URI's path must match
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    { grep -E '^[[:space:]]*URIs:' "$f" | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//' | tr ' ' '\n'
      grep -E '^[[:space:]]*deb[[:space:]]' "$f" | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E "$want" | head -n 1 || true
  done | head -n 1
}
MIRROR=${DEBIAN_MIRROR:-$(apt_uri '/debian/?$')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
SECURITY=${DEBIAN_SECURITY_MIRROR:-$(apt_uri '/debian-security/?$')}
SECURITY=${SECURITY%/}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/splitserve-base.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "${BASE_IMAGES_REFRESH:-0}" = 1 ] || ! present "$DEBIAN_IMAGE"; then
  log "debootstrap $DEBIAN_SUITE from $MIRROR (about a minute)"
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

  # The suite, its updates and (where apt has one) its security archive, as the
  # official image lists them.
  rm -f "$rootfs/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$MIRROR" "$DEBIAN_SUITE" "$DEBIAN_SUITE"
    if [ -n "$SECURITY" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$SECURITY" "$DEBIAN_SUITE"
    fi
  } >"$rootfs/etc/apt/sources.list.d/debian.sources"

  # Slim: packages installed later leave out docs, man pages and translations
  # too (the official slim image's dpkg configuration), and apt keeps no .debs.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
         "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  find "$rootfs/usr/share/doc" -mindepth 1 -type f ! -name copyright -delete
  : >"$rootfs/etc/hostname"
  : >"$rootfs/etc/resolv.conf"

  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.description=\"debian:$DEBIAN_SUITE-slim bootstrapped locally (scripts/image/base-images.sh)\"" \
    - "$DEBIAN_IMAGE" >/dev/null
  log "made $DEBIAN_IMAGE ($(podman image inspect --format '{{.Size}}' "$DEBIAN_IMAGE" | numfmt --to=iec --suffix=B))"
fi

if [ "${BASE_IMAGES_REFRESH:-0}" = 1 ] || ! present "$RUST_IMAGE"; then
  command -v rustc >/dev/null 2>&1 || die "no rustc on PATH: the builder image needs a local Rust $RUST_VERSION toolchain"
  release=$(rustc -vV | sed -n 's/^release: //p')
  host=$(rustc -vV | sed -n 's/^host: //p')
  case "$release" in
    "$RUST_VERSION"|"$RUST_VERSION".*) ;;
    *) die "the local rustc is $release, the Dockerfile wants RUST_VERSION=$RUST_VERSION: install that toolchain or pass --build-arg RUST_VERSION=<its major.minor> (make image RUST_VERSION=...)" ;;
  esac
  sysroot=$(rustc --print sysroot)
  flags=$(podman_flags "$DEBIAN_IMAGE")
  log "building $RUST_IMAGE: $DEBIAN_IMAGE + build-essential + the local toolchain $release ($sysroot)"
  # shellcheck disable=SC2086
  podman build $flags --pull=never --format docker \
    --file "$ROOT/scripts/image/rust.Containerfile" \
    --build-arg BASE="$DEBIAN_IMAGE" \
    --build-arg TOOLCHAIN="$release-$host" \
    --build-arg RUST_RELEASE="$release" \
    --label org.opencontainers.image.description="rust:$RUST_VERSION-$DEBIAN_SUITE made locally from the host's Rust $release (scripts/image/base-images.sh)" \
    --tag "$RUST_IMAGE" \
    "$sysroot"
  log "made $RUST_IMAGE"
fi

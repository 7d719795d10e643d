#!/usr/bin/env bash
# Compiled dependencies shared between checkouts, as CI caches do for target/.
#
#   bash scripts/build-cache.sh restore   # before a build: a checkout without target/release
#                                         # starts from the cached one (tch's C++ and the
#                                         # dependency tree: most of a cold build)
#   bash scripts/build-cache.sh save      # after `make test`'s suites: keeps target/release
#                                         # (without incremental state) if none is cached yet
#
# The key is everything the compiled dependencies depend on: Cargo.lock, the manifests,
# the compiler and the shared requirements venv (scripts/setup.sh) whose libtorch they
# link. Only a .venv on that shared base takes part: a venv of one checkout would bake
# its own path into the cached build. cargo's fingerprints still decide what to rebuild;
# this checkout's crates (their package ids carry the path) always are. One entry is
# kept; SPLITSERVE_CACHE= (empty) turns the cache off.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${SPLITSERVE_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve}
overlay=${VENV:-.venv}/.splitserve-base
[ -n "$CACHE" ] && [ -f "$overlay" ] || exit 0

key=$({ cat Cargo.lock Cargo.toml client/Cargo.toml "$overlay"; rustc -vV; } | sha256sum | cut -c1-16)
entry="$CACHE/target-$key"

case "${1:-}" in
  restore)
    if [ ! -d target/release ] && [ -f "$entry/.complete" ]; then
      mkdir -p target
      cp -a "$entry/release" target/release
      echo "build-cache: target/release from $entry (compiled dependencies; this checkout's crates rebuild)"
    fi
    ;;
  save)
    [ -d target/release ] && [ ! -f "$entry/.complete" ] || exit 0
    mkdir -p "$CACHE"
    (
      flock 9
      [ -f "$entry/.complete" ] && exit 0
      tmp="$CACHE/.saving-target.$$"
      rm -rf "$tmp" && mkdir -p "$tmp/release"
      tar -C target/release --exclude=./incremental -cf - . | tar -C "$tmp/release" -xf -
      touch "$tmp/.complete"
      rm -rf "$CACHE"/target-*
      mv "$tmp" "$entry"
      echo "build-cache: saved target/release as $entry"
    ) 9>"$CACHE/.lock"
    ;;
  *)
    echo "usage: $0 restore|save" >&2
    exit 2
    ;;
esac

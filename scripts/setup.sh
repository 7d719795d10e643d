#!/usr/bin/env bash
# One set-up for every entry point (make run, make test, the container build):
# a project-local Python venv with the torch wheel (which carries libtorch) and
# the test clients. Idempotent: does nothing when requirements.txt is unchanged.
#
# The requirements (torch alone is 4.7 GB) are the same for every checkout of the
# same requirements.txt, so they are installed once into a shared base venv under
# $SPLITSERVE_CACHE (default ~/.cache/splitserve, keyed by requirements.txt and
# the Python version), and a new checkout's .venv is a small venv of its own that
# sees the base's packages (a .pth file) and holds what belongs to the checkout:
# the exporter (editable) and the deploy-test tools. libtorch then lives at the
# same path for every checkout, so compiled dependencies can be reused between
# checkouts too (scripts/build-cache.sh). SPLITSERVE_CACHE= (empty) installs
# everything into .venv itself, as the container build does; an existing .venv
# of that kind is kept and updated in place.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${SPLITSERVE_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve}
stamp="$VENV/.requirements.sha256"
overlay="$VENV/.splitserve-base"
# The exporter (scripts/export) is installed too; the container build copies
# requirements.txt and this script only, without it.
exporter=scripts/export/pyproject.toml
want=$(cat requirements.txt $([ -f "$exporter" ] && echo "$exporter") | sha256sum | cut -d' ' -f1)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && { [ ! -f "$overlay" ] || [ -f "$(cat "$overlay")/.complete" ]; }; then
  touch "$stamp"
  exit 0
fi

install_exporter() {
  if [ -f "$exporter" ]; then
    # Editable: `splitserve-export` and `python -m splitserve_export` run this checkout.
    "$VENV/bin/python" -m pip install --quiet --no-deps -e scripts/export
  fi
}

if [ -n "$CACHE" ] && { [ ! -e "$VENV" ] || [ -f "$overlay" ]; }; then
  key=$({ cat requirements.txt; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
  base="$CACHE/venv-$key"
  mkdir -p "$CACHE"
  (
    # One checkout installs the base; others set up at the same time wait for it.
    flock 9
    if [ ! -f "$base/.complete" ]; then
      rm -rf "$base"
      echo "setup: installing Python requirements into $base (shared by checkouts; torch is large: a few minutes the first time)"
      "$PYTHON" -m venv "$base"
      "$base/bin/python" -m pip install --quiet --upgrade pip
      "$base/bin/python" -m pip install --quiet -r requirements.txt
      touch "$base/.complete"
    fi
  ) 9>"$CACHE/.lock"
  echo "setup: $VENV on the shared requirements in $base"
  rm -rf "$VENV"
  "$PYTHON" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path) so the base's own .pth files are processed too.
  echo "import site; site.addsitedir('$base_site')" >"$site/splitserve-base.pth"
  # The requirements' commands (pytest, grpcurl, ...) on the venv's PATH.
  for f in "$base/bin/"*; do
    n=$(basename "$f")
    case "$n" in python* | pip* | activate* | Activate*) continue ;; esac
    [ -e "$VENV/bin/$n" ] || ln -s "$f" "$VENV/bin/$n"
  done
  echo "$base" >"$overlay"
  install_exporter
  echo "$want" >"$stamp"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "setup: installing Python requirements into $VENV (torch is large: a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
install_exporter
echo "$want" >"$stamp"

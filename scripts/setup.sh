#!/usr/bin/env bash
# One set-up for every entry point (make run, make test, the container build):
# a project-local Python venv with the torch wheel (which carries libtorch) and
# the test clients. Idempotent: does nothing when requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.requirements.sha256"
# The exporter (scripts/export) is installed too; the container build copies
# requirements.txt and this script only, without it.
exporter=scripts/export/pyproject.toml
want=$(cat requirements.txt $([ -f "$exporter" ] && echo "$exporter") | sha256sum | cut -d' ' -f1)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python requirements into $VENV (torch is large: a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  if [ -f "$exporter" ]; then
    # Editable: `splitserve-export` and `python -m splitserve_export` run this checkout.
    "$VENV/bin/python" -m pip install --quiet --no-deps -e scripts/export
  fi
  echo "$want" > "$stamp"
fi

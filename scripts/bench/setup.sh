#!/usr/bin/env bash
# Sets up what scripts/bench/v2.py needs, beside the project's own .venv and
# without touching it; idempotent (does nothing when the requirements files are
# unchanged):
#   - .venv-bench: the load generator, perf_analyzer from the tritonclient wheel
#     (scripts/bench/requirements-loadgen.txt);
#   - .venv-peers: the peer servers, MLServer and Triton via nvidia-pytriton, with
#     torch (scripts/bench/requirements-peers.txt; about 5 GB with torch's CUDA
#     libraries, a few minutes the first time);
#   - Debian's libb64-0d (libb64.so.0d, which perf_analyzer links), with apt-get
#     when it is missing (root).
#
# Usage: bash scripts/bench/setup.sh     (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}

log() { printf 'bench setup: %s\n' "$*" >&2; }

venv() {  # venv DIR REQUIREMENTS
  local dir=$1 req=$2 stamp="$1/.requirements.sha256" want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ ! -x "$dir/bin/python" ]; then
    log "creating $dir"
    "$PYTHON" -m venv "$dir"
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing $req into $dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
  fi
}

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  log "installing libb64-0d (Debian) for perf_analyzer"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
  fi
fi

venv .venv-bench scripts/bench/requirements-loadgen.txt
venv .venv-peers scripts/bench/requirements-peers.txt

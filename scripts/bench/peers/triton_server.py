"""Triton Inference Server (the tritonserver 2.51 that the nvidia-pytriton
wheel bundles) serving one TorchScript file, for scripts/bench/v2.py.

The model is a PyTriton Python function: Triton's Python backend hands each
(batch of) request(s) to this process, which runs the TorchScript module under
torch.no_grad(). Triton's own PyTorch backend (pytorch_libtorch), which would
run the file without Python, is not in the wheel: it bundles the Python
backend only.

Tensor names follow Triton's PyTorch backend, as splitserve does: INPUT__0 in,
OUTPUT__0 out. With --max-batch-size above 1, Triton's dynamic batcher
(max_queue_delay_microseconds 0: it batches what is queued and never waits)
and PyTriton's @batch decorator; else batching off, one request per call.

Security: PyTriton protects Triton's administrative endpoints with an access
token; statistics is left open here so that perf_analyzer can read the
model's server-side statistics without sending the token.

Usage (from the repository root, in .venv-peers; scripts/bench/setup.sh):
  .venv-peers/bin/python scripts/bench/peers/triton_server.py \\
      --model tests/fixtures/generated/mlp512.pt --name mlp --shape 1x512 \\
      --grpc-port 8001 --http-port 8000 --metrics-port 8002
Prints `ready` on stdout once the model is loaded.
"""

import argparse
import os
import signal
import sys
import sysconfig

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="TorchScript file")
    p.add_argument("--name", default="mlp")
    p.add_argument("--shape", required=True, help="one request's input, e.g. 1x512")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=0, help="dynamic batching (0: off)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    shape = [int(d) for d in args.shape.split("x")]
    module = torch.jit.load(args.model, map_location="cpu").eval()
    with torch.no_grad():
        out_shape = list(module(torch.zeros(shape)).shape)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    if args.max_batch_size > 1:

        @batch
        def infer(INPUT__0):  # noqa: N803 (Triton's tensor name)
            return {"OUTPUT__0": forward(INPUT__0)}

        config = ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher())
        in_dims, out_dims = shape[1:], out_shape[1:]
    else:

        def infer(requests):
            return [{"OUTPUT__0": forward(r["INPUT__0"])} for r in requests]

        config = ModelConfig(batching=False)
        in_dims, out_dims = shape, out_shape  # one request, one row

    # The Python backend's stub links the interpreter's shared libpython.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_timeout_secs=5,
    )
    security = TritonSecurityConfig(
        restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    )
    # SIGTERM stops Triton through the context manager, as Ctrl-C would.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with Triton(config=triton_config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name="INPUT__0", dtype=np.float32, shape=tuple(in_dims))],
            outputs=[Tensor(name="OUTPUT__0", dtype=np.float32, shape=tuple(out_dims))],
            config=config,
            strict=False,
        )
        print("ready", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

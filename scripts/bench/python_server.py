"""The Python baseline: what splitlearn_comm users run, grpcio + PyTorch.

Serves splitlearn.comm.ComputeService from the project's proto with one
TorchScript model, the way splitlearn_comm 1.0's servers do:

  threadpool  grpc.server(ThreadPoolExecutor(max_workers=10)), PyTorch's
              default threads (GRPCComputeServer as users run it).
  single      max_workers=1 and every thread knob at one: OMP_NUM_THREADS,
              MKL_NUM_THREADS (set before torch is imported) and
              torch.set_num_threads(1) (the usual "one thread" fix).
  aio         grpc.aio.server() with async handlers (AsyncGRPCComputeServer):
              the tensor is decoded and encoded on the event loop and the
              forward runs through loop.run_in_executor(None, ...), as
              AsyncModelComputeFunction does.

Tensors are decoded and encoded exactly like splitlearn_comm's TensorCodec
(float32 bytes, np.frombuffer -> reshape -> torch.from_numpy(copy).float()).
splitlearn_comm's per-request log, metrics and history bookkeeping is left
out, so if anything this baseline is a little faster than the real servers.

Usage: python python_server.py --port PORT --model FILE.pt --mode MODE
       [--warmup-shape 1x512]
Prints "ready" on stdout once serving; SIGTERM or SIGINT stops it (exit 0).
"""

import os
import sys

MODES = ("threadpool", "single", "aio")


def _mode_from_argv(argv):
    """--mode from argv, read by hand: torch must not be imported yet."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
    return None


if _mode_from_argv(sys.argv[1:]) == "single":
    # Read by OpenMP and MKL when torch loads them: must precede `import torch`.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "splitlearn" / "comm" / "compute_service.proto"
MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # splitlearn_comm's default, both ways
THREADPOOL_WORKERS = 10
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", True),
    ("grpc.http2.max_pings_without_data", 0),
]
VERSION = "1.0.0"


def load_stubs():
    """(compute_service_pb2, compute_service_pb2_grpc) compiled from the project's proto."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="splitlearn-stubs-") as out:
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO_FILE),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE.name} (exit {rc})")
        sys.path.insert(0, out)
        try:
            from splitlearn.comm import compute_service_pb2, compute_service_pb2_grpc
        finally:
            sys.path.remove(out)
    return compute_service_pb2, compute_service_pb2_grpc


pb2, pb2_grpc = load_stubs()


# --- TensorCodec, as splitlearn_comm writes it --------------------------------


def decode(data: bytes, shape) -> torch.Tensor:
    array = np.frombuffer(data, dtype=np.float32).reshape(tuple(shape))
    return torch.from_numpy(array.copy()).float()


def encode(tensor: torch.Tensor):
    array = tensor.cpu().numpy().astype(np.float32)
    return array.tobytes(), tuple(tensor.shape)


# --- The model ---------------------------------------------------------------


class Model:
    """A TorchScript module run under no_grad on the CPU."""

    def __init__(self, path: str):
        self.path = path
        self.module = torch.jit.load(path, map_location="cpu")
        self.module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)

    def warm_up(self, shape) -> None:
        self.forward(torch.zeros(tuple(shape), dtype=torch.float32))


# --- The service --------------------------------------------------------------


class Stats:
    def __init__(self, mode: str, model: Model):
        self.mode = mode
        self.model = model
        self.started = time.time()
        self.total_requests = 0

    def health(self):
        return pb2.HealthResponse(
            status="ok",
            message="Service is healthy",
            version=VERSION,
            uptime_seconds=time.time() - self.started,
        )

    def service_info(self):
        info = pb2.ServiceInfoResponse(
            service_name="ComputeService",
            version=VERSION,
            device="cpu",
            uptime_seconds=time.time() - self.started,
            total_requests=self.total_requests,
        )
        info.custom_info["server"] = f"python-{self.mode}"
        info.custom_info["model"] = os.path.basename(self.model.path)
        info.custom_info["torch"] = torch.__version__
        info.custom_info["torch_threads"] = str(torch.get_num_threads())
        return info


def compute_response(output: torch.Tensor, request, started: float):
    data, shape = encode(output)
    response = pb2.ComputeResponse(
        data=data,
        shape=list(shape),
        compute_time_ms=(time.time() - started) * 1000.0,
    )
    if request.HasField("request_id"):
        response.request_id = request.request_id
    return response


class ThreadedServicer(pb2_grpc.ComputeServiceServicer):
    """ComputeServicer: the whole request runs on a grpc.server pool thread."""

    def __init__(self, stats: Stats):
        self.stats = stats

    def Compute(self, request, context):
        self.stats.total_requests += 1
        started = time.time()
        try:
            output = self.stats.model.forward(decode(request.data, request.shape))
            return compute_response(output, request, started)
        except Exception as e:  # splitlearn_comm answers INTERNAL with the message
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(str(e))
            return pb2.ComputeResponse()

    def HealthCheck(self, request, context):
        return self.stats.health()

    def GetServiceInfo(self, request, context):
        return self.stats.service_info()


class AsyncServicer(pb2_grpc.ComputeServiceServicer):
    """AsyncComputeServicer: codec on the event loop, forward in the loop's executor."""

    def __init__(self, stats: Stats):
        self.stats = stats

    async def Compute(self, request, context):
        self.stats.total_requests += 1
        started = time.time()
        try:
            x = decode(request.data, request.shape)
            loop = asyncio.get_running_loop()
            output = await loop.run_in_executor(None, self.stats.model.forward, x)
            return compute_response(output, request, started)
        except Exception as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"Computation failed: {e}")

    async def HealthCheck(self, request, context):
        return self.stats.health()

    async def GetServiceInfo(self, request, context):
        return self.stats.service_info()


# --- Serving ------------------------------------------------------------------


def announce_ready(port: int, stats: Stats) -> None:
    print("ready", flush=True)
    print(
        f"python-{stats.mode} serving {os.path.basename(stats.model.path)} on port {port}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        file=sys.stderr,
        flush=True,
    )


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_threaded(port: int, stats: Stats, workers: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    pb2_grpc.add_ComputeServiceServicer_to_server(ThreadedServicer(stats), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise RuntimeError(f"cannot listen on 127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server.start()
    announce_ready(port, stats)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=1).wait()


async def serve_aio(port: int, stats: Stats) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb2_grpc.add_ComputeServiceServicer_to_server(AsyncServicer(stats), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise RuntimeError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce_ready(port, stats)
    await stop.wait()
    await server.stop(grace=1)


def parse_shape(text: str):
    return [int(d) for d in text.lower().split("x")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, help="TorchScript file")
    p.add_argument("--mode", choices=MODES, default="threadpool")
    p.add_argument(
        "--warmup-shape",
        type=parse_shape,
        default=None,
        help="run one forward of this shape (e.g. 1x512) before serving",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "single":
        torch.set_num_threads(1)
    model = Model(args.model)
    if args.warmup_shape:
        model.warm_up(args.warmup_shape)
    stats = Stats(args.mode, model)
    if args.mode == "aio":
        asyncio.run(serve_aio(args.port, stats))
    else:
        workers = 1 if args.mode == "single" else THREADPOOL_WORKERS
        serve_threaded(args.port, stats, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

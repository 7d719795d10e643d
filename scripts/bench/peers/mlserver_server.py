"""MLServer (the `mlserver` package) serving one TorchScript file over the Open
Inference Protocol, for scripts/bench/v2.py.

The model runs in mlserver_runtime.TorchScriptRuntime (torch.jit.load, forward
under no_grad). Everything else is MLServer's own server, with its default
settings except: debug (per-request access logs) off, loopback ports, and,
with --max-batch-size above 1, MLServer's adaptive batching.

MLServer's gRPC service has no ModelConfig (nor ModelStatistics), which
perf_analyzer needs before it sends a request. This process adds both RPCs to
MLServer's gRPC server, under the same `inference.GRPCInferenceService`:
ModelConfig describes the model as Triton would (max_batch_size, INPUT__0 and
OUTPUT__0 without the batch dimension), ModelStatistics answers the
successful requests this process has counted (MLServer keeps no Triton-style
statistics). Neither is on the inference path.

Usage (from the repository root, in .venv-peers; scripts/bench/setup.sh):
  .venv-peers/bin/python scripts/bench/peers/mlserver_server.py \\
      --model tests/fixtures/generated/mlp512.pt --name mlp --shape 1x512 \\
      --grpc-port 8001 --http-port 8000 --metrics-port 8002
Prints `ready` on stdout once the model is loaded.
"""

import argparse
import ast
import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch
from mlserver import MLServer
from mlserver.grpc import server as mlserver_grpc
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import MetadataTensor
from google.protobuf import descriptor_pool, message_factory

HERE = Path(__file__).resolve().parent
SERVICE = "inference.GRPCInferenceService"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="TorchScript file")
    p.add_argument("--name", default="mlp")
    p.add_argument("--shape", required=True, help="one request's input, e.g. 1x512")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--parallel-workers", type=int, default=None,
                   help="MLServer's inference worker processes (default: MLServer's, 1)")
    p.add_argument("--max-batch-size", type=int, default=0, help="adaptive batching (0: off)")
    p.add_argument("--max-batch-time", type=float, default=0.0,
                   help="seconds adaptive batching waits for a full batch")
    return p.parse_args()


def triton_messages():
    """Triton's protobuf messages, from tritonclient's generated files, in a pool
    of their own: MLServer registers the same `inference.*` names (a subset) in
    protobuf's default pool, so importing tritonclient.grpc here would fail
    with "duplicate symbol"."""
    package = Path(importlib.util.find_spec("tritonclient").origin).parent / "grpc"
    pool = descriptor_pool.DescriptorPool()
    for name in ("model_config_pb2.py", "service_pb2.py"):
        tree = ast.parse((package / name).read_text())
        (blob,) = [
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "AddSerializedFile"
        ]
        pool.AddSerializedFile(blob)
    names = ("ModelConfig", "ModelInput", "ModelOutput", "ModelConfigRequest", "ModelConfigResponse",
             "ModelStatisticsRequest", "ModelStatisticsResponse", "ModelStatistics", "InferStatistics",
             "StatisticDuration", "ModelReadyRequest", "ModelReadyResponse")  # fmt: skip
    messages = {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{n}")) for n in names}
    data_type = pool.FindEnumTypeByName("inference.DataType")
    return SimpleNamespace(**messages, TYPE_FP32=data_type.values_by_name["TYPE_FP32"].number)


pb = triton_messages()


def output_dims(module_path: str, shape: list) -> list:
    module = torch.jit.load(module_path, map_location="cpu").eval()
    with torch.no_grad():
        return list(module(torch.zeros(shape)).shape)


class TritonExtras:
    """ModelConfig and ModelStatistics for MLServer's gRPC server."""

    def __init__(self, name: str, in_dims: list, out_dims: list, max_batch_size: int):
        self.name = name
        self.config = pb.ModelConfig(
            name=name,
            platform="pytorch_libtorch",
            backend="mlserver",
            max_batch_size=max(1, max_batch_size),
            input=[pb.ModelInput(
                name="INPUT__0", data_type=pb.TYPE_FP32, dims=in_dims[1:])],
            output=[pb.ModelOutput(
                name="OUTPUT__0", data_type=pb.TYPE_FP32, dims=out_dims[1:])],
        )  # fmt: skip
        self.count = 0
        self.ns = 0
        self.last = 0

    def count_infer(self, started_ns: int) -> None:
        self.count += 1
        self.ns += time.monotonic_ns() - started_ns
        self.last = int(time.time() * 1000)

    async def model_config(self, request, context):
        if request.name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return pb.ModelConfigResponse(config=self.config)

    async def model_statistics(self, request, context):
        d = lambda: pb.StatisticDuration(count=self.count, ns=self.ns)  # noqa: E731
        z = lambda: pb.StatisticDuration(count=self.count, ns=0)  # noqa: E731
        stats = pb.ModelStatistics(
            name=self.name,
            version="1",
            last_inference=self.last,
            inference_count=self.count,
            execution_count=self.count,
            inference_stats=pb.InferStatistics(
                success=d(), queue=z(), compute_input=z(), compute_infer=d(), compute_output=z()),
        )  # fmt: skip
        return pb.ModelStatisticsResponse(model_stats=[stats])

    def handler(self):
        return grpc.method_handlers_generic_handler(SERVICE, {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                self.model_config,
                request_deserializer=pb.ModelConfigRequest.FromString,
                response_serializer=pb.ModelConfigResponse.SerializeToString),
            "ModelStatistics": grpc.unary_unary_rpc_method_handler(
                self.model_statistics,
                request_deserializer=pb.ModelStatisticsRequest.FromString,
                response_serializer=pb.ModelStatisticsResponse.SerializeToString),
        })  # fmt: skip


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts ModelInfer calls for ModelStatistics (time to the handler's return)."""

    def __init__(self, extras: TritonExtras):
        self.extras = extras

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method != f"/{SERVICE}/ModelInfer" or handler is None:
            return handler
        inner = handler.unary_unary

        async def infer(request, context):
            started = time.monotonic_ns()
            reply = await inner(request, context)
            self.extras.count_infer(started)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            infer,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def add_extras(extras: TritonExtras) -> None:
    """Wraps MLServer's gRPC server factory: same server, two more RPCs."""
    create = mlserver_grpc.GRPCServer._create_server
    make_server = mlserver_grpc.aio.server

    def server_with_interceptor(*args, **kwargs):
        kwargs["interceptors"] = list(kwargs.get("interceptors") or []) + [CountingInterceptor(extras)]
        return make_server(*args, **kwargs)

    def create_server(self):
        mlserver_grpc.aio.server = server_with_interceptor
        try:
            server = create(self)
        finally:
            mlserver_grpc.aio.server = make_server
        server.add_generic_rpc_handlers((extras.handler(),))
        return server

    mlserver_grpc.GRPCServer._create_server = create_server


async def serve(args) -> None:
    shape = [int(d) for d in args.shape.split("x")]
    out = output_dims(args.model, shape)
    add_extras(TritonExtras(args.name, shape, out, args.max_batch_size))
    settings = dict(
        host="127.0.0.1",
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        debug=False,
    )
    if args.parallel_workers is not None:
        settings["parallel_workers"] = args.parallel_workers
    model = ModelSettings(
        name=args.name,
        implementation="mlserver_runtime.TorchScriptRuntime",
        parameters=ModelParameters(uri=str(Path(args.model).resolve())),
        inputs=[MetadataTensor(name="INPUT__0", datatype="FP32", shape=[-1] + shape[1:])],
        outputs=[MetadataTensor(name="OUTPUT__0", datatype="FP32", shape=[-1] + out[1:])],
        max_batch_size=args.max_batch_size,
        max_batch_time=args.max_batch_time,
    )
    server = MLServer(Settings(**settings))
    start = asyncio.ensure_future(server.start([model]))
    while not start.done():  # ready once the model answers ModelReady over gRPC
        await asyncio.sleep(0.1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
                ready = channel.unary_unary(
                    f"/{SERVICE}/ModelReady",
                    request_serializer=pb.ModelReadyRequest.SerializeToString,
                    response_deserializer=pb.ModelReadyResponse.FromString,
                )
                if (await ready(pb.ModelReadyRequest(name=args.name), timeout=1)).ready:
                    break
        except grpc.aio.AioRpcError:
            continue
    print("ready", flush=True)
    await start


def main() -> int:
    args = parse_args()
    # The inference workers import the runtime by name, as MLServer's CLI would
    # from a model folder.
    sys.path.insert(0, str(HERE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

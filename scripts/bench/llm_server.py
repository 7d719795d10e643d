"""The Python baseline for the LLM benchmark: a transformers trunk behind
grpc.server, as splitlearn_comm users serve one.

The trunk is GPT-2's decoder blocks themselves (transformers' GPT2Block, the
attention transformers picks by default, SDPA) with the weights read from a
file that splitserve-export wrote, so it computes what the splitserve trunk
computes. Each request runs as splitlearn_comm's ComputeServicer runs it:

- the input and every past_key_values entry decoded like its TensorCodec and
  KVCacheCodec (raw float32 bytes, np.frombuffer -> reshape -> copy -> float;
  an entry needs its shapes, key and value shapes equal);
- the model called as its ModelComputeFunction calls one, under no_grad:
  model(input, past_key_values=..., use_cache=...), the trunk turning the
  legacy tuple into a DynamicCache and back, as a split trunk must since
  transformers dropped tuple caches;
- the output and the whole present cache encoded back the same way;
- on a grpc.server(ThreadPoolExecutor(max_workers=10)) with splitlearn_comm's
  100 MB message limits.

The attention is given no mask: right for what the benchmark sends (a prefill
on an empty cache, then one position per step), not for a prefill on top of a
cache. splitlearn_comm's per-request log, metrics and history bookkeeping is
left out, so if anything this baseline is a little faster than the real server.

Usage: python llm_server.py --port PORT --model FILE.pt
Prints "ready" on stdout once serving; SIGTERM or SIGINT stops it (exit 0).
"""

import argparse
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import torch  # noqa: E402

# The project's stubs, the TensorCodec and the server options of the other Python baseline.
import python_server as base  # noqa: E402

pb2, pb2_grpc = base.pb2, base.pb2_grpc
MANIFEST = "splitserve_export.json"  # what splitserve-export stores beside the trunk


# --- KVCacheCodec, as splitlearn_comm writes it -------------------------------


def decode_cache(entries):
    """The request's past_key_values as a tuple of (key, value), None when empty."""
    if not entries:
        return None
    past = []
    for i, e in enumerate(entries):
        if not e.key_shape or not e.value_shape:
            raise ValueError(f"Layer {i}: Missing shape information in KVCacheEntry")
        if tuple(e.key_shape) != tuple(e.value_shape):
            raise ValueError(f"Layer {i}: Key and Value shapes must match")
        past.append((base.decode(e.key_data, e.key_shape), base.decode(e.value_data, e.value_shape)))
    return tuple(past)


def encode_cache(present):
    entries = []
    for i, (key, value) in enumerate(present):
        if key.shape != value.shape:
            raise ValueError(f"Layer {i}: Key and Value tensors must have the same shape")
        kd, ks = base.encode(key)
        vd, vs = base.encode(value)
        entries.append(pb2.KVCacheEntry(key_data=kd, key_shape=list(ks), value_data=vd, value_shape=list(vs)))
    return entries


# --- The trunk ------------------------------------------------------------------


class Gpt2Trunk(torch.nn.Module):
    """GPT-2 decoder blocks FIRST..END-1 with a DynamicCache, the weights of an
    exported trunk (its parameter names are transformers' own)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path  # named in GetServiceInfo
        from transformers import AutoConfig
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        extra = {MANIFEST: ""}
        scripted = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        manifest = json.loads(extra[MANIFEST])
        spec = dict(manifest["config"])
        if spec.pop("model_type") != "gpt2":
            raise SystemExit(f"{path}: this baseline runs GPT-2 trunks only")
        config = AutoConfig.for_model("gpt2", **spec)
        config._attn_implementation = "sdpa"  # transformers' default for GPT-2
        first, end = manifest["layers"]
        # Numbered from 0: the cache holds this trunk's layers only.
        self.blocks = torch.nn.ModuleList(GPT2Block(config, layer_idx=i) for i in range(end - first))
        state = {}
        for name, tensor in scripted.state_dict().items():
            parts = name.split(".")  # transformer.h.<layer>.<rest>
            state[".".join([str(int(parts[2]) - first)] + parts[3:])] = tensor
        self.blocks.load_state_dict(state, strict=True)
        self.eval()

    def forward(self, hidden, past_key_values=None, use_cache=False):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=past_key_values) if past_key_values else DynamicCache()
        for block in self.blocks:
            hidden = block(hidden, cache=cache, use_cache=True)
        if not use_cache:
            return hidden
        present = tuple((layer.keys, layer.values) for layer in cache.layers[: len(self.blocks)])
        return hidden, present


# --- The service ------------------------------------------------------------------


class Servicer(pb2_grpc.ComputeServiceServicer):
    """ComputeServicer's Compute: decode, model(...), encode, on a pool thread."""

    def __init__(self, model: Gpt2Trunk):
        self.model = model
        self.stats = base.Stats("threadpool", model)

    def Compute(self, request, context):
        self.stats.total_requests += 1
        started = time.time()
        try:
            x = base.decode(request.data, request.shape)
            past = decode_cache(request.past_key_values)
            use_cache = request.HasField("use_cache") and request.use_cache
            with torch.no_grad():
                out = self.model(x, past_key_values=past, use_cache=use_cache)
            present = None
            if isinstance(out, tuple):
                out, present = out
            response = base.compute_response(out, request, started)
            if present is not None:
                response.present_key_values.extend(encode_cache(present))
            return response
        except Exception as e:  # splitlearn_comm answers INTERNAL with the message
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(str(e))
            return pb2.ComputeResponse()

    def HealthCheck(self, request, context):
        return self.stats.health()

    def GetServiceInfo(self, request, context):
        return self.stats.service_info()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, help="a GPT-2 trunk written by splitserve-export")
    args = p.parse_args(argv)
    model = Gpt2Trunk(args.model)
    servicer = Servicer(model)
    server = grpc.server(ThreadPoolExecutor(max_workers=base.THREADPOOL_WORKERS), options=base.SERVER_OPTIONS)
    pb2_grpc.add_ComputeServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{args.port}") == 0:
        raise RuntimeError(f"cannot listen on 127.0.0.1:{args.port}")
    signal.signal(signal.SIGTERM, base._raise_interrupt)
    server.start()
    base.announce_ready(args.port, servicer.stats)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

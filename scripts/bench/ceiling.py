"""In-process ceiling: one-row forwards per second of a TorchScript file in Python.

No RPC, no serialization: a single thread calls the model back to back under
torch.no_grad() with PyTorch's default thread settings, so the number is the
most a one-forward-at-a-time Python server could answer on this machine.

Usage: python ceiling.py --model FILE.pt --shape 1x512 [--duration 5] [--warmup 1]
Prints one JSON line: {"throughput_rps", "p50_ms", "p99_ms", "threads", ...}.
"""

import argparse
import json
import sys
import time

import torch


def parse_shape(text: str):
    return tuple(int(d) for d in text.lower().split("x"))


def parse_seconds(text: str) -> float:
    return float(text[:-1] if text.endswith("s") else text)


def percentile(sorted_values, p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_for(model, x, seconds: float):
    """Latencies in seconds of back-to-back forwards for `seconds`, and the time taken."""
    latencies = []
    start = time.perf_counter()
    end = start + seconds
    now = start
    with torch.no_grad():
        while now < end:
            model(x)
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
    return latencies, now - start


def measure(model_path: str, shape, duration: float, warmup: float) -> dict:
    model = torch.jit.load(model_path, map_location="cpu")
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    run_for(model, x, warmup)
    latencies, elapsed = run_for(model, x, duration)
    latencies.sort()
    return {
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000.0,
        "p99_ms": percentile(latencies, 99) * 1000.0,
        "threads": torch.get_num_threads(),
        "forwards": len(latencies),
        "duration_s": elapsed,
        "shape": list(shape),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="TorchScript file")
    p.add_argument("--shape", type=parse_shape, default=(1, 512), help="e.g. 1x512")
    p.add_argument("--duration", type=parse_seconds, default=5.0, help="seconds measured")
    p.add_argument("--warmup", type=parse_seconds, default=1.0, help="seconds not measured")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.model, args.shape, args.duration, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

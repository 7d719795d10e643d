"""Writes the TorchScript models the tests and benchmarks load.

Usage: python scripts/make_fixtures.py OUT_DIR

Every model is seeded, so the files are the same on every run; tests compare
splitserve's answers with this torch running the same file.
"""

import math
import sys
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn


class Raiser(nn.Module):
    """Raises inside TorchScript when the input holds a NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(x).any()):
            raise RuntimeError("input contains NaN")
        return x * 2.0


class Pair(nn.Module):
    """Returns a tuple: not something Compute can answer with."""

    def forward(self, x: torch.Tensor):
        return x, x


class AddMul(nn.Module):
    """Two inputs, two outputs (the Open Inference Protocol tests): INPUT__0 and
    INPUT__1 are float32 [N, 4]; OUTPUT__0 = a + b, OUTPUT__1 = a * b. Not
    pair.pt, which stays the one-input model whose tuple Compute refuses."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class Embed(nn.Module):
    """Token ids (int64) in, float32 embeddings out."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(100, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


class RowSum(nn.Module):
    """Collapses the batch dimension: breaks batching on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True)


class BatchProbe(nn.Module):
    """Makes batching and computation observable to a test without the
    server's counters. Each output row is [forwards, rows]: how many forwards
    this module has run so far (this one included; a buffer counts them), and
    how many rows the forward that computed it held, i.e. the size of the
    batch the request was part of. Any trailing shape works (x is [N, ...]);
    the output is [N, 2] in x's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("forwards", torch.zeros(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards.add_(1.0)
        rows = x.shape[0]
        zero = x.reshape(rows, -1)[:, :1] * 0
        return torch.cat([zero + self.forwards.to(x.dtype), zero + rows], dim=1)


class DeviceFault(nn.Module):
    """Raises libtorch's texts for device failures so that CPU tests see what a
    GPU raises, chosen by the first input value: 1 CUDA out of memory, 2 a
    cuBLAS failure, 3 a device-side assert (which poisons a CUDA context).
    On a GPU (make gpu-check) the real ones: 4 allocates 1 TiB on the input's
    device, 5 looks up an embedding row past the table's end (on CUDA a
    device-side assert). Anything else: x * 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.reshape(-1)[0]
        if bool(first == 1.0):
            raise RuntimeError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                "capacity of 79.19 GiB of which 1.06 GiB is free."
            )
        if bool(first == 2.0):
            raise RuntimeError(
                "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, "
                "opa, opb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`"
            )
        if bool(first == 3.0):
            raise RuntimeError(
                "CUDA error: device-side assert triggered\nCUDA kernel errors might be "
                "asynchronously reported at some other API call, so the stacktrace below "
                "might be incorrect."
            )
        if bool(first == 4.0):
            return x + torch.empty(1 << 40, dtype=torch.uint8, device=x.device)[:1].zero_()
        if bool(first == 5.0):
            ids = torch.full([1], 1000, dtype=torch.long, device=x.device)
            return x + torch.nn.functional.embedding(ids, torch.zeros(10, 1, device=x.device)).sum()
        return x * 2.0


class CausalAttention(nn.Module):
    """One causal self-attention layer that extends a (key, value) cache."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        batch, steps, width = x.shape
        head = width // self.heads
        q, k, v = self.qkv(x).split(width, dim=2)
        q = q.view(batch, steps, self.heads, head).transpose(1, 2)
        k = torch.cat([past_key, k.view(batch, steps, self.heads, head).transpose(1, 2)], dim=2)
        v = torch.cat([past_value, v.view(batch, steps, self.heads, head).transpose(1, 2)], dim=2)
        past = k.shape[2] - steps
        scores = q @ k.transpose(-2, -1) / math.sqrt(head)
        # Position past+i sees every cached position and the new ones up to itself.
        allowed = torch.ones(steps, past + steps, dtype=torch.bool, device=x.device).tril(diagonal=past)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(batch, steps, width)
        return x + self.proj(y), (k, v)


class CausalBlockKV(nn.Module):
    """The KV-cache signature splitserve calls (docs/training.md):
    forward(hidden [B, T, D], past: [key_0, value_0, key_1, value_1, ...] or [])
    -> (hidden [B, T, D], present: the same list extended by T positions).
    Each layer's (key, value) pair is two consecutive list entries, each
    [B, heads, positions, D / heads]."""

    def __init__(self, width: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList([CausalAttention(width, heads) for _ in range(layers)])

    def forward(
        self, hidden: torch.Tensor, past: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        batch, _, width = hidden.shape
        empty = hidden.new_zeros(batch, self.heads, 0, width // self.heads)
        present: List[torch.Tensor] = []
        i = 0
        for layer in self.layers:
            if len(past) > 0:
                key, value = past[2 * i], past[2 * i + 1]
            else:
                key, value = empty, empty
            hidden, kv = layer(hidden, key, value)
            present.append(kv[0])
            present.append(kv[1])
            i += 1
        return hidden, present


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    models = {
        "mlp.pt": nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
        "mlp512.pt": nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)
        ),
        "encoder.pt": nn.TransformerEncoderLayer(
            d_model=256, nhead=4, dim_feedforward=1024, batch_first=True, dropout=0.0
        ),
        "raiser.pt": Raiser(),
        "pair.pt": Pair(),
        "addmul.pt": AddMul(),
        "embed.pt": Embed(),
        "rowsum.pt": RowSum(),
        # The server's partition in the split-training tests: the client holds the
        # bottom (8 features out), splitserve trains this top.
        "top.pt": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        "attn_kv.pt": CausalBlockKV(),
        # Added last: the models above keep their seeded weights.
        "batch_probe.pt": BatchProbe(),
        "device_fault.pt": DeviceFault(),
    }
    for name, module in models.items():
        module.eval()
        torch.jit.script(module).save(str(out / name))
    print(f"wrote {len(models)} TorchScript models to {out}")


if __name__ == "__main__":
    main()

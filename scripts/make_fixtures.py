"""Writes the TorchScript models the tests and benchmarks load.

Usage: python scripts/make_fixtures.py OUT_DIR

Every model is seeded, so the files are the same on every run; tests compare
splitserve's answers with this torch running the same file.
"""

import sys
from pathlib import Path

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
        "embed.pt": Embed(),
        "rowsum.pt": RowSum(),
    }
    for name, module in models.items():
        module.eval()
        torch.jit.script(module).save(str(out / name))
    print(f"wrote {len(models)} TorchScript models to {out}")


if __name__ == "__main__":
    main()

"""Writes the PyTorch 2 packages (.pt2: torch.export + AOTInductor) the tests and
benchmarks load, beside the TorchScript fixtures.

Usage: python scripts/make_pt2_fixtures.py OUT_DIR [--bench]

Compiling a package takes about a minute (the C++ compiler runs), so packages
are cached by the torch version and this file's content, under
$SPLITSERVE_PT2_CACHE (default ~/.cache/splitserve/pt2), and copied to
OUT_DIR/pt2/. Each package is written with its module's weights
(NAME.state.pt, a state_dict) so that tests compare the server's answers with
torch running the same module eagerly. --bench adds the twins of the benchmark
models (mlp512, encoder).
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn
from torch.export import Dim


class Mlp(nn.Module):
    """Linear 16 -> 32 -> 8 with a ReLU: exported with a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class AddMul(nn.Module):
    """Two named inputs (keyword arguments: the call spec names them), a tuple
    of two outputs: (a + b, a * b), all float32 [N, 4]."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class Static(nn.Module):
    """Linear 4 -> 3, exported for exactly [2, 4]: refuses other batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def twin(module: nn.Module, torchscript: Path) -> nn.Module:
    """The module with the weights of its TorchScript fixture (make_fixtures.py): the
    benchmark compares the same model in both formats."""
    module.load_state_dict(torch.jit.load(str(torchscript)).state_dict())
    return module


def mlp512(out: Path) -> nn.Module:
    return twin(
        nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)),
        out / "mlp512.pt",
    )


def encoder(out: Path) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True, dropout=0.0)
    return twin(layer, out / "encoder.pt")


def packages(bench: bool, fixtures: Path) -> Dict[str, tuple]:
    """name -> (module factory, example args, example kwargs, dynamic_shapes)."""
    batch = Dim("batch", min=1, max=1024)
    out = {
        "mlp": (lambda: (torch.manual_seed(0), Mlp())[1], (torch.randn(4, 16),), {}, {"x": {0: batch}}),
        "addmul": (
            AddMul,
            (),
            {"a": torch.randn(3, 4), "b": torch.randn(3, 4)},
            {"a": {0: batch}, "b": {0: batch}},
        ),
        "static": (lambda: (torch.manual_seed(3), Static())[1], (torch.randn(2, 4),), {}, None),
    }
    if bench:
        out["mlp512"] = (lambda: mlp512(fixtures), (torch.randn(4, 512),), {}, ({0: Dim("batch", min=1, max=256)},))
        out["encoder"] = (
            lambda: encoder(fixtures),
            (torch.randn(4, 64, 256),),
            {},
            ({0: Dim("batch", min=1, max=64)},),
        )
    return out


#: Raise when a package above changes: the cache is keyed by it and torch's version.
FIXTURES_VERSION = 2


def cache_dir() -> Path:
    root = os.environ.get("SPLITSERVE_PT2_CACHE") or str(Path.home() / ".cache" / "splitserve" / "pt2")
    return Path(root) / f"torch-{torch.__version__}-v{FIXTURES_VERSION}"


def build(name: str, spec: tuple, dest: Path) -> None:
    factory, args, kwargs, dynamic = spec
    module = factory().eval()
    program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    # Written elsewhere first (the archive's top folder is the file's stem),
    # then moved: an interrupted run leaves no half package in the cache.
    tmp = dest / ".partial"
    tmp.mkdir(exist_ok=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / f"{name}.pt2"))
    torch.save(module.state_dict(), dest / f"{name}.state.pt")
    (tmp / f"{name}.pt2").rename(dest / f"{name}.pt2")


def main() -> None:
    out = Path(sys.argv[1]) / "pt2"
    bench = "--bench" in sys.argv[2:]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, spec in packages(bench, Path(sys.argv[1])).items():
        if not (cache / f"{name}.pt2").is_file():
            build(name, spec, cache)
            made.append(name)
        for suffix in (".pt2", ".state.pt"):
            shutil.copyfile(cache / f"{name}{suffix}", out / f"{name}{suffix}")
    print(f"pt2 packages in {out} (compiled now: {', '.join(made) or 'none'}; cache {cache})")


if __name__ == "__main__":
    main()

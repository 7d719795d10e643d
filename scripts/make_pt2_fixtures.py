"""Writes the PyTorch 2 packages (.pt2: torch.export + AOTInductor) the tests and
benchmarks load, beside the TorchScript fixtures.

Usage: python scripts/make_pt2_fixtures.py OUT_DIR [--bench]

Compiling a package takes about a minute (the C++ compiler runs), so packages
are cached by the torch version and this file's content, under
$SPLITSERVE_PT2_CACHE (default ~/.cache/splitserve/pt2), and copied to
OUT_DIR/pt2/. Each package is written with its module's weights
(NAME.state.pt, a state_dict) so that tests compare the server's answers with
torch running the same module eagerly. --bench adds the twins of the benchmark
models (mlp512, encoder). The split-LLM exporter's `--format pt2` trunks
(GPT-2 and Qwen2 layers with random weights, `LLM`) are written to
OUT_DIR/pt2/llm/NAME/ by this checkout's exporter, cached by the torch version
and the exporter's source.

Every package but one is made as docs/pt2.md says a user should make one
(`compile_package`): its batch dimension takes one row, so the server never
pads. `addmul` is made the older way on purpose (a plain export: AOTInductor's
0/1 specialisation compiles its batch as at least 2 rows), so the tests keep
covering the padding the server does for such packages.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.fx.experimental._config as fx_config
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


class Rows(nn.Module):
    """x times the number of rows the package was run on: a one-row request
    answers x only if the package ran on one row (a padded batch answers 2x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.size(0)


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
    """name -> (module factory, example args, example kwargs, dynamic_shapes).
    Made with compile_package, but for the names in LEGACY."""
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
        "rows": (Rows, (torch.randn(3, 4),), {}, {"x": {0: batch}}),
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


#: Split-LLM trunks for `splitserve-export --format pt2` (tests/python/test_llm_pt2.py):
#: name -> (config, layers), weights torch.manual_seed(LLM_SEED) then from_config.
#: Weights ten times the default make attention sharp enough that a wrong mask shows.
LLM_SEED = 3
LLM = {
    "gpt2": (dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, n_positions=128,
                  vocab_size=256, bos_token_id=0, eos_token_id=0, initializer_range=0.2), "1:2"),
    "qwen2": (dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   vocab_size=256, initializer_range=0.2), "1:3"),
}

#: Made with a plain export and compile, as packages were made before
#: compile_package: compiled for batches of at least 2 rows.
LEGACY = {"addmul"}

#: Raise when a package above changes: the cache is keyed by it and torch's version.
FIXTURES_VERSION = 3


def cache_dir() -> Path:
    root = os.environ.get("SPLITSERVE_PT2_CACHE") or str(Path.home() / ".cache" / "splitserve" / "pt2")
    return Path(root) / f"torch-{torch.__version__}-v{FIXTURES_VERSION}"


def compile_package(module: nn.Module, args: tuple, kwargs: dict, dynamic, path: str) -> str:
    """Exports and compiles `module` so that its batch dimension takes 1 row
    (docs/pt2.md, "Making a package"); returns how.

    AOTInductor compiles a dynamic dimension as "at least 2" by default (its
    0/1 specialisation) and the package refuses a one-row batch, which the
    server then pads to two rows: twice the work. Exported under
    backed_size_oblivious, the dimension keeps its Dim's min of 1 (the
    package checks ">= 1"). Some modules refuse that (a size-1 guard inside an
    operator: nn.MultiheadAttention's input projection asks whether its
    transposed input is contiguous, which holds only for one row); those are
    exported as usual and compiled without the lower-bound check
    (aot_inductor.check_lowerbound), which torch.export's program, valid for
    the Dim's whole range, allows."""
    try:
        with fx_config.patch(backed_size_oblivious=True):
            program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    except torch._dynamo.exc.UserError:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(
            program, package_path=path, inductor_configs={"aot_inductor.check_lowerbound": False})
        return "check_lowerbound off"
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return "backed_size_oblivious"


def check_package(module: nn.Module, path: str, args: tuple, kwargs: dict, dynamic) -> None:
    """The package's answers equal the module's within 1e-5, at one row and
    at the example's rows, when its batch dimension is dynamic."""
    runner = torch._inductor.aoti_load_package(path)
    sizes = [None] + ([1] if dynamic is not None else [])
    for rows in sizes:
        a = tuple(t if rows is None else t[:rows].contiguous() for t in args)
        k = {n: (t if rows is None else t[:rows].contiguous()) for n, t in kwargs.items()}
        with torch.no_grad():
            want, got = module(*a, **k), runner(*a, **k)
        for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
            if not torch.allclose(w, g, rtol=0, atol=1e-5):
                raise SystemExit(f"{path}: the package's answer at {rows or 'example'} rows differs "
                                 f"from eager by {(w - g).abs().max().item()}")


def build(name: str, spec: tuple, dest: Path) -> Optional[str]:
    factory, args, kwargs, dynamic = spec
    module = factory().eval()
    # Written elsewhere first (the archive's top folder is the file's stem),
    # then moved: an interrupted run leaves no half package in the cache.
    tmp = dest / ".partial"
    tmp.mkdir(exist_ok=True)
    path = str(tmp / f"{name}.pt2")
    if name in LEGACY or dynamic is None:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(program, package_path=path)
        how = None
    else:
        how = compile_package(module, args, kwargs, dynamic, path)
        check_package(module, path, args, kwargs, dynamic)
    torch.save(module.state_dict(), dest / f"{name}.state.pt")
    (tmp / f"{name}.pt2").rename(dest / f"{name}.pt2")
    return how


def llm_trunks(out: Path) -> list:
    """Writes out/llm/NAME/ (config.pbtxt, 1/model.pt2) for every LLM trunk with
    this checkout's exporter (`--format pt2`, about a minute each); returns the
    names compiled now."""
    exporter = Path(__file__).resolve().parent / "export"
    key = hashlib.sha256(json.dumps([LLM, LLM_SEED], sort_keys=True).encode())
    for f in sorted((exporter / "splitserve_export").glob("*.py")):
        key.update(f.read_bytes())
    cache = cache_dir().parent / f"torch-{torch.__version__}-llm-{key.hexdigest()[:16]}"
    made = []
    for name, (spec, layers) in LLM.items():
        if not (cache / name / "config.pbtxt").is_file():
            if str(exporter) not in sys.path:
                sys.path.insert(0, str(exporter))
            from splitserve_export.cli import main as export_main

            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "config.json").write_text(json.dumps(spec))
                if export_main(["--config", str(Path(d) / "config.json"), "--seed", str(LLM_SEED),
                                "--layers", layers, "--name", name, "--format", "pt2",
                                "--out", str(Path(d) / "out")]) != 0:
                    raise SystemExit(f"splitserve-export --format pt2 failed for {name}")
                partial = cache / f".{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(Path(d) / "out" / name, partial)
                partial.rename(cache / name)
            made.append(f"llm/{name}")
        dest = out / "llm" / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(cache / name, dest)
    return made


def main() -> None:
    # As the server does: every package checks its inputs (check_package's
    # one-row run is refused by a package compiled for at least 2 rows).
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
    out = Path(sys.argv[1]) / "pt2"
    bench = "--bench" in sys.argv[2:]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, spec in packages(bench, Path(sys.argv[1])).items():
        if not (cache / f"{name}.pt2").is_file():
            how = build(name, spec, cache)
            made.append(f"{name} ({how})" if how else name)
        for suffix in (".pt2", ".state.pt"):
            shutil.copyfile(cache / f"{name}{suffix}", out / f"{name}{suffix}")
    made += llm_trunks(out)
    print(f"pt2 packages in {out} (compiled now: {', '.join(made) or 'none'}; cache {cache})")


if __name__ == "__main__":
    main()

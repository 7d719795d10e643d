#!/usr/bin/env python3
"""Writes the TorchScript files of the example model repository.

    .venv/bin/python examples/model_repository/make_models.py             # into this directory
    .venv/bin/python examples/model_repository/make_models.py /srv/repo   # elsewhere: config.pbtxt copied too
    .venv/bin/python examples/model_repository/make_models.py --version 2 /srv/repo   # a new version

Three models in Triton's layout, each `<out>/<model>/config.pbtxt` (committed
here) and `<out>/<model>/<version>/model.pt` (written by this script):

    mlp        INPUT__0 FP32 [N, 8] -> OUTPUT__0 FP32 [N, 4]; max_batch_size 8, dynamic batching
    add_mul    INPUT__0, INPUT__1 FP32 [4] -> OUTPUT__0 = a + b, OUTPUT__1 = a * b; no batch dimension
    tuple_out  INPUT__0 FP32 [N, 4] -> (OUTPUT__0 = softmax [N, 4], OUTPUT__1 = row sums [N, 1])

Use the torch of the venv that the server is built against (the project's
.venv), so that its libtorch reads the files. The weights of version V are
drawn with seed V: a new version gives the MLP new outputs, which makes a
reload in poll mode visible.

Files appear atomically: a new version directory is written under a hidden
name and renamed into place, an existing model.pt is replaced by a rename, so
a server polling the repository never reads half a file.

--configmap NAME [--namespace NS] prints the `kubectl create configmap` command and the Helm
values (modelRepository.configMap) that serve the written repository from a
ConfigMap (model.pt lands in binaryData).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Tuple

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent


class Mlp(nn.Module):
    """8 -> 16 -> 4 with a ReLU; rows are independent, so it batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AddMul(nn.Module):
    """Two inputs, two outputs (a tuple): their sum and their product."""

    def forward(self, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        return a + b, a * b


class TupleOut(nn.Module):
    """One input, a tuple of two outputs of different shapes."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.softmax(x, dim=-1), x.sum(dim=-1, keepdim=True)


#: name -> (module factory, example inputs, the output shapes those inputs give).
#: The shapes are those of each config.pbtxt: a leading batch dimension (2 rows
#: here) where max_batch_size > 0.
MODELS: dict[str, tuple[Callable[[], nn.Module], list[tuple[int, ...]], list[tuple[int, ...]]]] = {
    "mlp": (Mlp, [(2, 8)], [(2, 4)]),
    "add_mul": (AddMul, [(4,), (4,)], [(4,), (4,)]),
    "tuple_out": (TupleOut, [(2, 4)], [(2, 4), (2, 1)]),
}


def _save_atomically(module: torch.jit.ScriptModule, version_dir: Path) -> Path:
    target = version_dir / "model.pt"
    if version_dir.is_dir():
        tmp = version_dir / ".model.pt.tmp"
        torch.jit.save(module, str(tmp))
        os.replace(tmp, target)
        return target
    tmp_dir = version_dir.with_name(f".{version_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    torch.jit.save(module, str(tmp_dir / "model.pt"))
    os.rename(tmp_dir, version_dir)
    return target


def _check(path: Path, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]) -> str:
    """Loads the written file back and runs it on inputs of the configured shapes."""
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        result = loaded(*[torch.randn(shape) for shape in inputs])
    got = list(result) if isinstance(result, tuple) else [result]
    shapes = [tuple(t.shape) for t in got]
    if shapes != outputs or any(t.dtype != torch.float32 for t in got):
        raise SystemExit(f"make_models: {path} gives {shapes}, config.pbtxt says {outputs}")
    ins = ", ".join(f"INPUT__{i} {list(s)}" for i, s in enumerate(inputs))
    outs = ", ".join(f"OUTPUT__{i} {list(s)}" for i, s in enumerate(outputs))
    return f"{ins} -> {outs}"


def write_repository(out: Path, version: int) -> list[Path]:
    """Writes model.pt of every model at `version` (and config.pbtxt when out is
    not this directory); returns the files of the repository."""
    out = out.resolve()
    copy_configs = out != HERE
    files = []
    for name, (factory, inputs, outputs) in MODELS.items():
        model_dir = out / name
        model_dir.mkdir(parents=True, exist_ok=True)
        config = model_dir / "config.pbtxt"
        if copy_configs:
            tmp = model_dir / ".config.pbtxt.tmp"
            shutil.copyfile(HERE / name / "config.pbtxt", tmp)
            os.replace(tmp, config)
        files.append(config)
        torch.manual_seed(version)
        module = torch.jit.script(factory().eval())
        path = _save_atomically(module, model_dir / str(version))
        files.append(path)
        print(f"{name}/{version}/model.pt: {_check(path, inputs, outputs)}")
    return files


def configmap_key(rel: str) -> str:
    """A ConfigMap key for a repository path: keys are flat, mlp/1/model.pt -> mlp.1.model.pt."""
    return rel.replace("/", ".")


def print_configmap(name: str, out: Path, files: list[Path], namespace: str | None = None) -> None:
    rels = sorted(p.relative_to(out).as_posix() for p in files)
    size = sum(p.stat().st_size for p in files)
    print(f"\n# {len(rels)} files, {size} bytes (a ConfigMap holds at most 1 MiB):")
    args = " \\\n  ".join(f"--from-file={configmap_key(r)}={out / r}" for r in rels)
    ns = f"-n {namespace} " if namespace else ""
    print(f"kubectl {ns}create configmap {name} \\\n  {args}\n")
    print("# Helm values:")
    print("modelRepository:\n  enabled: true\n  source: configMap\n  configMap:")
    print(f"    name: {name}\n    items:")
    for r in rels:
        print(f"      - {{key: {configmap_key(r)}, path: {r}}}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "out", nargs="?", type=Path, default=HERE, help="repository directory (default: this example's directory)"
    )
    parser.add_argument("--version", type=int, default=1, help="version directory to write (default: 1)")
    parser.add_argument("--configmap", metavar="NAME", help="print how to serve the repository from ConfigMap NAME")
    parser.add_argument("--namespace", metavar="NS", help="the namespace the printed kubectl command creates it in")
    args = parser.parse_args(argv)
    if args.version < 1:
        parser.error("--version must be a positive integer (Triton's version directories)")
    print(f"make_models: writing version {args.version} into {args.out.resolve()}")
    files = write_repository(args.out, args.version)
    if args.configmap:
        print_configmap(args.configmap, args.out.resolve(), files, args.namespace)
    return 0


if __name__ == "__main__":
    sys.exit(main())

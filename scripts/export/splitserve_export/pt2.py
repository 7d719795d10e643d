"""`--format pt2`: the trunk as a PyTorch 2 AOTInductor package (NAME/V/model.pt2),
for inference without a KV cache.

The package's one entry point is the trunk's forward with an empty past:
`hidden_states` [batch, positions, width] (float32) in, `hidden_states_out` out,
with the batch and the positions dynamic (1..the context limit), so a prompt of
any length is one call and a client decodes by sending the whole sequence again.

Why no KV signature: a package's call spec fixes the pytree of its inputs, so
one package cannot take both the first step's empty `past` and the later steps'
2 x layers tensors; and the server's batched decode (`decode_batch`) writes each
row's new key and value into its cache in place at a position given as a Python
int, which torch.export records as a constant. The KV trunk stays TorchScript.
"""

import os
from pathlib import Path
from typing import Tuple

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim

#: Refusals for what a package cannot be (the message is the user's).
NO_LORA = ("--format pt2 writes an inference-only package (compiled kernels, no autograd): "
           "a --lora trunk trains; export it as TorchScript (the default --format torchscript)")
NO_KV_SESSIONS = ("--format pt2 writes a trunk without a KV cache (a package cannot take the "
                  "KV signature): --kv-sessions needs the TorchScript trunk (--format torchscript)")


class Prefill(nn.Module):
    """The trunk without a cache: forward(hidden, []) of every position at once."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, hidden_states: torch.Tensor):
        return {"hidden_states_out": self.trunk(hidden_states, [])[0]}


def compile_package(module: nn.Module, example: torch.Tensor, context: int, path: Path) -> str:
    """Exports and compiles so that a batch of one row and a single position
    are taken as they are (docs/pt2.md, "Making a package"); returns how."""
    dynamic = {"hidden_states": {0: Dim("batch", min=1, max=1024),
                                 1: Dim("positions", min=1, max=context)}}
    from splitserve_export.export import ExportError

    kwargs = {"hidden_states": example}
    try:
        with fx_config.patch(backed_size_oblivious=True):
            program = torch.export.export(module, (), kwargs, dynamic_shapes=dynamic)
    except Exception:  # the experimental setting refuses: the usual export below
        # A size-1 guard inside an operator (the attention's reshapes ask whether
        # a transposed tensor is contiguous, true for one position only): export
        # as usual, valid for the whole range, and compile without AOTInductor's
        # "at least 2" input check.
        try:
            program = torch.export.export(module, (), kwargs, dynamic_shapes=dynamic)
        except Exception as e:
            raise ExportError(
                f"torch.export cannot capture this trunk ({str(e).strip().splitlines()[0][:200]}): "
                "export it as TorchScript (--format torchscript)") from None
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={"aot_inductor.check_lowerbound": False})
        return "check_lowerbound off"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return "backed_size_oblivious"


def self_check(module: nn.Module, path: Path, width: int, warmup: Tuple[int, int],
               context: int, dtype: torch.dtype) -> None:
    """Loads the written package with its input checks on and compares it with
    the trunk at one row and one position and at the warm-up shape."""
    from splitserve_export.export import ExportError

    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
    runner = torch._inductor.aoti_load_package(str(path))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    for batch, positions in ((1, 1), (warmup[0], min(warmup[1], context))):
        x = torch.randn(batch, positions, width, generator=gen)
        with torch.no_grad():
            want = module(x)["hidden_states_out"]
            try:
                got = runner(hidden_states=x)["hidden_states_out"]
            except RuntimeError as e:
                raise ExportError(
                    f"the compiled package refuses a {batch}x{positions} input "
                    f"({str(e).strip().splitlines()[0][:200]}; please report this)") from None
        if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
            raise ExportError(
                f"the compiled package's answer at {batch}x{positions} differs from the trunk's "
                "(please report this)")


def write(trunk: nn.Module, name: str, entry: Path, version: int, manifest: dict) -> Path:
    """Writes NAME/V/model.pt2 and NAME/config.pbtxt; returns the package's path."""
    width, context = manifest["hidden_size"], manifest["max_context"]
    module = Prefill(trunk).eval()
    package = entry / str(version) / "model.pt2"
    package.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside (as model.pt2: the archive's top folder is the file's
    # stem), checked, then renamed into place: a repository rescan never sees
    # half a package.
    partial = package.parent / ".partial"
    partial.mkdir(exist_ok=True)
    tmp = partial / "model.pt2"
    example = torch.randn(2, min(5, context), width)
    compile_package(module, example, context, tmp)
    self_check(module, tmp, width, tuple(manifest["warmup"]), context, trunk.dtype)
    os.replace(tmp, package)
    partial.rmdir()
    config_file = entry / "config.pbtxt"
    tmp = config_file.with_name("config.pbtxt.tmp")
    tmp.write_text(config_pbtxt(name, manifest))
    os.replace(tmp, config_file)
    return package


def config_pbtxt(name: str, m: dict) -> str:
    w = m["hidden_size"]
    first, end = m["layers"]
    return "\n".join([
        f"# splitserve-export --format pt2: layers {first}..{end - 1} of {m['source']} "
        f"({m['model_type']}), {m['dtype']} weights.",
        "# An AOTInductor package without a KV cache: forward(hidden_states) of every",
        "# position at once; float32 in and out.",
        f'name: "{name}"',
        'platform: "torch_aoti"',
        "max_batch_size: 0",
        f'input [ {{ name: "hidden_states" data_type: TYPE_FP32 dims: [ -1, -1, {w} ] }} ]',
        f'output [ {{ name: "hidden_states_out" data_type: TYPE_FP32 dims: [ -1, -1, {w} ] }} ]',
        f'parameters: {{ key: "splitserve.max_context" value: {{ string_value: "{m["max_context"]}" }} }}',
    ]) + "\n"

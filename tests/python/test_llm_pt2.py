"""splitserve-export --format pt2: GPT-2 and Qwen2 trunks (random weights) as
AOTInductor packages, served from a model repository by the real binary, and
compared with transformers' own layers over splitlearn's ComputeService and the
Open Inference Protocol."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc

from conftest import ROOT, Server
from test_llm_export import GPT2, QWEN2, SEED, TOL, Oracle, export_cli, hf_model
from test_training import compute

LAYERS = {"gpt2": "1:2", "qwen2": "1:3"}
SPECS = {"gpt2": GPT2, "qwen2": QWEN2}

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def cached_entry(name: str, tmp: Path) -> Path:
    """The exporter's entry for `name`. Compiling a package takes about a
    minute, so entries are kept, as the .pt2 fixtures are, by torch's version
    and what made them (the exporter's source, the config, seed and layers)."""
    key = hashlib.sha256()
    for f in sorted((ROOT / "scripts" / "export" / "splitserve_export").glob("*.py")):
        key.update(f.read_bytes())
    key.update(json.dumps([SPECS[name], SEED, LAYERS[name]], sort_keys=True).encode())
    root = Path(os.environ.get("SPLITSERVE_PT2_CACHE") or Path.home() / ".cache" / "splitserve" / "pt2")
    cached = root / f"torch-{torch.__version__}-llm" / f"{name}-{key.hexdigest()[:16]}"
    if not (cached / "config.pbtxt").is_file():
        (tmp / f"{name}.json").write_text(json.dumps(SPECS[name]))
        out = tmp / "export"
        assert export_cli("--config", str(tmp / f"{name}.json"), "--seed", str(SEED),
                          "--layers", LAYERS[name], "--name", name, "--format", "pt2",
                          "--out", str(out)) == 0
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(out / name, partial)
        partial.rename(cached)
    return cached


@pytest.fixture(scope="module")
def served(tmp_path_factory, pb):
    tmp = tmp_path_factory.mktemp("llm-pt2")
    repo = tmp / "repo"
    for name in SPECS:
        shutil.copytree(cached_entry(name, tmp), repo / name)
    s = Server("--model-repository", str(repo), "--device", "cpu", "--workers", "1")
    s.wait_ok(pb)
    yield s
    assert s.terminate() == 0


def test_pt2_trunks_equal_transformers_layers_through_the_server(pb, served):
    pb2, pb2_grpc = pb
    g = tgrpc.InferenceServerClient(served.addr)
    gen = torch.Generator().manual_seed(7)
    with served.channel() as channel:
        stub = pb2_grpc.ComputeServiceStub(channel)
        for name, spec in SPECS.items():
            first, end = (int(n) for n in LAYERS[name].split(":"))
            model = hf_model(spec, SEED)
            oracle = Oracle(model, first, end)
            try:
                # One row and one position (compiled to take them as they are),
                # a prompt, and two rows.
                for batch, positions in ((1, 1), (1, 7), (2, 16)):
                    oracle.cache = type(oracle.cache)(config=model.config)
                    x = torch.randn(batch, positions, 64, generator=gen)
                    want, _ = oracle.step(x)
                    _, got = compute(stub, pb2, x, model_id=name)
                    torch.testing.assert_close(got, want, **TOL)
                    r = g.infer(name, [named_input(x)], client_timeout=30)
                    torch.testing.assert_close(torch.from_numpy(r.as_numpy("hidden_states_out")),
                                               want, **TOL)
            finally:
                oracle.close()
        # No KV cache in a package: the client hears so.
        with pytest.raises(grpc.RpcError) as e:
            compute(stub, pb2, torch.zeros(1, 2, 64), model_id="qwen2", use_cache=True)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "has no KV cache" in e.value.details(), e.value.details()
        meta = g.get_model_metadata("gpt2", as_json=True)
        assert meta["platform"] == "torch_aoti"
        assert [(i["name"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == [
            ("hidden_states", [-1, -1, 64])]


def named_input(x: torch.Tensor):
    i = tgrpc.InferInput("hidden_states", list(x.shape), "FP32")
    i.set_data_from_numpy(x.numpy().astype(np.float32))
    return i


def test_pt2_refuses_what_a_package_cannot_be(tmp_path, capsys):
    for extra, why in ((["--lora", "4,8,q_proj"], "a --lora trunk trains"),
                       (["--kv-sessions"], "--kv-sessions needs the TorchScript trunk")):
        assert export_cli("--config", "qwen2-tiny-random", "--layers", "1:3", "--format", "pt2",
                          "--out", str(tmp_path), *extra) == 2
        err = capsys.readouterr().err
        assert why in err, err
    assert not any(tmp_path.iterdir()), "nothing is written for a refused request"

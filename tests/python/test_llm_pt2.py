"""splitserve-export --format pt2: GPT-2 and Qwen2 trunks (random weights) as
AOTInductor packages, served from a model repository by the real binary, and
compared with transformers' own layers over splitlearn's ComputeService and the
Open Inference Protocol."""

import sys

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc

from conftest import FIXTURES, ROOT, Server
from test_llm_export import TOL, Oracle, export_cli, hf_model
from test_training import compute

sys.path.insert(0, str(ROOT / "scripts"))
import make_pt2_fixtures as pt2  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def served(pb):
    """The trunks `make fixtures` exported (scripts/make_pt2_fixtures.py: LLM),
    served from their model repository as the exporter wrote it."""
    repo = FIXTURES / "pt2" / "llm"
    for name in pt2.LLM:
        assert (repo / name / "1" / "model.pt2").is_file(), f"{repo / name} is missing: run `make fixtures`"
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
        for name, (spec, layers) in pt2.LLM.items():
            first, end = (int(n) for n in layers.split(":"))
            model = hf_model(spec, pt2.LLM_SEED)
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

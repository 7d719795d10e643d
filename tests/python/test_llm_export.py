"""splitserve-export (scripts/export): decoder layers of Hugging Face causal LMs
written as splitserve trunks, served by the real binary and driven by a
splitlearn_comm-style client (raw float32 bytes, past_key_values /
present_key_values passed back unchanged). The oracle is transformers itself:
the whole model runs with the trunk's input put in front of layer FIRST and the
output taken after layer END-1, with its own masks, rotary positions and
DynamicCache, exactly as generate() runs it. Tiny configs (width 64) keep it fast."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from conftest import ROOT, Server
from test_training import compute, from_wire, to_wire

TOL = dict(atol=1e-4, rtol=1e-4)
EXPORTER = ROOT / "scripts" / "export"
SEED = 3
#: The GPT-2 trunk comes from a config file with seeded random weights; weights
#: ten times larger than the default make attention sharp enough that a wrong
#: position or mask shows.
GPT2 = dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, n_positions=128,
            vocab_size=256, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
#: The Qwen2 trunk comes from a saved model directory: grouped-query attention
#: (4 heads, 2 key/value heads), rotary positions, RMSNorm.
QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             vocab_size=256, initializer_range=0.2)
LAYERS = {"gpt2": (1, 3), "qwen2": (1, 4), "qwen2-lora": (1, 3)}
LORA = "4,8,q_proj,v_proj,down_proj"
#: Trunks also served as NAMEs with --kv-sessions.
SESSIONS = ("gpt2", "qwen2")


# transformers' and torch's deprecation notes (TorchScript itself is deprecated in
# torch 2.13, and tch runs nothing else) are not this file's subject.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def export_cli(*args: str):
    """The exporter's main() in this process (no second transformers import); this
    checkout's copy even where the installed one is another's."""
    if str(EXPORTER) not in sys.path:
        sys.path.insert(0, str(EXPORTER))
    from splitserve_export.cli import main

    return main(list(args))


def hf_model(spec: dict, seed: int):
    """What --config documents: torch.manual_seed(seed), then from_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def decoder_layers(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


class Oracle:
    """transformers' decoding of layers [first, end) with a DynamicCache."""

    def __init__(self, model, first: int, end: int):
        from transformers import DynamicCache

        self.model, self.first, self.end = model, first, end
        self.cache = DynamicCache(config=model.config)
        self.hidden = self.out = None
        layers = decoder_layers(model)

        def replace_input(_module, args, kwargs):
            if args:
                return (self.hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.hidden}

        def keep_output(_module, _args, _kwargs, output):
            self.out = output[0] if isinstance(output, tuple) else output

        self.hooks = [layers[first].register_forward_pre_hook(replace_input, with_kwargs=True),
                      layers[end - 1].register_forward_hook(keep_output, with_kwargs=True)]

    @torch.no_grad()
    def step(self, hidden: torch.Tensor):
        self.hidden = hidden
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long)
        self.model(input_ids=ids, cache=self.cache, use_cache=True)
        present = []
        for i in range(self.first, self.end):
            present += [self.cache.layers[i].keys, self.cache.layers[i].values]
        return self.out, present

    def close(self):
        for h in self.hooks:
            h.remove()


def kv_step(stub, pb2, model_id: str, hidden: torch.Tensor, past: list):
    """One step as splitlearn_comm's compute_with_cache sends it: use_cache and
    the cache it got back last time, entry for entry."""
    entries = []
    for k, v in zip(past[::2], past[1::2]):
        kd, ks = to_wire(k)
        vd, vs = to_wire(v)
        entries.append(pb2.KVCacheEntry(key_data=kd, key_shape=ks, value_data=vd, value_shape=vs))
    reply, out = compute(stub, pb2, hidden, model_id=model_id, use_cache=True,
                         past_key_values=entries)
    present = []
    for e in reply.present_key_values:
        present += [from_wire(e.key_data, e.key_shape), from_wire(e.value_data, e.value_shape)]
    return out, present


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """OUT with gpt2 (from a config file), qwen2 (from a model directory) and
    qwen2-lora (LoRA on qwen2's layers, its adapters then set to non-zero
    values as after training); and the source models."""
    tmp = tmp_path_factory.mktemp("llm")
    out = tmp / "repo"
    (tmp / "gpt2.json").write_text(json.dumps(GPT2))
    assert export_cli("--config", str(tmp / "gpt2.json"), "--seed", str(SEED),
                      "--layers", "1:3", "--out", str(out)) == 0
    qwen2 = hf_model(QWEN2, SEED + 1)
    qwen2.save_pretrained(tmp / "qwen2-dir")
    assert export_cli("--model", str(tmp / "qwen2-dir"), "--layers", "1:4",
                      "--out", str(out)) == 0
    assert export_cli("--model", str(tmp / "qwen2-dir"), "--layers", "1:3", "--lora", LORA,
                      "--name", "qwen2-lora", "--out", str(out)) == 0
    # "Train" the adapters: peft starts lora_B at zero, which would hide them.
    path = out / "qwen2-lora" / "1" / "model.pt"
    trunk = torch.jit.load(str(path))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    torch.jit.save(trunk, str(path))
    return out, {"gpt2": hf_model(GPT2, SEED), "qwen2": qwen2}


@pytest.fixture(scope="module")
def served(exported, pb):
    out, _ = exported
    args = []
    for name in LAYERS:
        args += ["--model", f"{name}={out / name / '1' / 'model.pt'}"]
    # The same trunks again, with their caches kept on the server.
    for name in SESSIONS:
        args += ["--model", f"{name}s={out / name / '1' / 'model.pt'}"]
    s = Server(*args, "--device", "cpu", "--kv-sessions", ",".join(f"{n}s" for n in SESSIONS))
    try:
        s.wait_ok(pb)
        yield pb[1].ComputeServiceStub(s.channel())
    finally:
        s.proc.kill()
        s.proc.wait()


def decode_and_compare(stub, pb2, model_id: str, oracle_model, batch: int, sessions=False):
    """Prefill then 16 decode steps against the oracle. With sessions, the cache
    stays on the server: the client passes back a handle whose bytes never grow
    and whose key shape carries the past length, where transformers reads it."""
    first, end = LAYERS[model_id]
    served_id = model_id + "s" if sessions else model_id
    gen = torch.Generator().manual_seed(batch)
    for prefill in (1, 7, 32):
        oracle = Oracle(oracle_model, first, end)
        try:
            past = []
            for step, new in enumerate([prefill] + [1] * 16):
                hidden = torch.randn(batch, new, 64, generator=gen)
                got, past = kv_step(stub, pb2, served_id, hidden, past)
                want, want_past = oracle.step(hidden)
                where = f"{served_id} batch {batch} prefill {prefill} step {step}"
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{where}: {m}")
                if sessions:
                    assert len(past) == 4 and all(t.numel() == 0 for t in past), where
                    assert {t.shape[2] for t in past} == {want_past[0].shape[2]}, where
                    continue
                assert len(past) == len(want_past) == 2 * (end - first), where
                for i, (g, w) in enumerate(zip(past, want_past)):
                    torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{where} cache {i}: {m}")
            assert past[0].shape[2] == prefill + 16
        finally:
            oracle.close()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("model_id", ["gpt2", "qwen2"])
def test_served_trunk_decodes_like_transformers_layers(exported, served, pb, model_id, batch):
    _, models = exported
    decode_and_compare(served, pb[0], model_id, models[model_id], batch)


@pytest.mark.parametrize("model_id,batch", [("gpt2", 1), ("qwen2", 2)])
def test_with_sessions_the_cache_stays_on_the_server_and_answers_are_the_same(
        exported, served, pb, model_id, batch):
    _, models = exported
    decode_and_compare(served, pb[0], model_id, models[model_id], batch, sessions=True)


def test_session_handles_are_refused_clearly_and_the_server_keeps_serving(served, pb):
    pb2 = pb[0]
    _, handle = kv_step(served, pb2, "gpt2s", torch.randn(1, 5, 64), [])
    assert [tuple(t.shape)[::2] for t in handle] == [(0, 5)] * 4
    # A forged handle (the same form, other random numbers) is not a session.
    forged = [torch.empty(0, 12345, 5, 678) for _ in handle]
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 64), forged)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "restart decoding from the prompt" in e.value.details()
    # Another model's session; a stale handle after the session moved on.
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "qwen2s", torch.randn(1, 1, 64), handle)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "gpt2s" in e.value.details()
    _, moved = kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 64), handle)
    assert moved[0].shape[2] == 6
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 64), handle)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has 6 positions but the request's handle says 5" in e.value.details()
    # A bad step leaves the session as it was; use_cache=false ends it.
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 63), moved)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    data, shape = to_wire(torch.randn(1, 1, 64))
    entries = [pb2.KVCacheEntry(key_data=b"", key_shape=list(k.shape), value_data=b"",
                                value_shape=list(v.shape)) for k, v in zip(moved[::2], moved[1::2])]
    reply = served.Compute(pb2.ComputeRequest(data=data, shape=shape, model_id="gpt2s",
                                              use_cache=False, past_key_values=entries), timeout=30)
    assert not reply.present_key_values and tuple(reply.shape) == (1, 1, 64)
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 64), moved)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A client that sends its own cache to a sessions model is served as before.
    _, real = kv_step(served, pb2, "gpt2", torch.randn(1, 3, 64), [])
    out, present = kv_step(served, pb2, "gpt2s", torch.randn(1, 1, 64), real)
    assert out.shape == (1, 1, 64) and present[0].shape == (1, 4, 4, 16)


def test_lora_trunk_equals_peft_and_trains_only_its_adapters(exported, served, pb):
    from peft import LoraConfig, get_peft_model

    out, models = exported
    r, alpha, *targets = LORA.split(",")
    peft_model = get_peft_model(
        hf_model(QWEN2, SEED + 1),
        LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=targets,
                   layers_to_transform=[1, 2], lora_dropout=0.0)).eval()
    trunk = torch.jit.load(str(out / "qwen2-lora" / "1" / "model.pt"))
    params = dict(trunk.named_parameters())
    # peft's own names, minus its wrapper: a trunk's adapters map onto a peft model.
    want = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()
            if k.startswith("base_model.model.model.layers.1.")
            or k.startswith("base_model.model.model.layers.2.")}
    assert set(params) == set(want)
    assert {k for k, p in params.items() if p.requires_grad} == {k for k in want if ".lora_" in k}
    assert any(".lora_A.default" in k for k in params) and any("mlp.down_proj.base_layer" in k for k in params)
    loaded = peft_model.load_state_dict({"base_model.model." + k: v for k, v in params.items()},
                                        strict=False)
    assert not loaded.unexpected_keys
    decode_and_compare(served, pb[0], "qwen2-lora", peft_model, batch=2)


def test_the_model_checks_its_past_and_context(served, pb):
    pb2 = pb[0]
    # gpt2's n_positions is 128.
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2", torch.randn(1, 129, 64), [])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 129 positions is past this model's maximum of 128" in e.value.details()
    _, past = kv_step(served, pb2, "gpt2", torch.randn(1, 4, 64), [])
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt2", torch.randn(1, 1, 64), past[:2])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "past has 2 tensors; this trunk of 2 layers takes none" in e.value.details()
    # The server keeps serving.
    out, _ = kv_step(served, pb2, "gpt2", torch.randn(1, 1, 64), past)
    assert out.shape == (1, 1, 64)
    # The model_id must be the served name.
    with pytest.raises(grpc.RpcError) as e:
        kv_step(served, pb2, "gpt-2", torch.randn(1, 1, 64), [])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "gpt2" in e.value.details()


def test_gpt2_lora_trunk_equals_peft(tmp_path):
    """GPT-2's LoRA wraps Conv1D layers (peft's fan_in_fan_out); in process."""
    from peft import LoraConfig, get_peft_model

    (tmp_path / "gpt2.json").write_text(json.dumps(GPT2))
    assert export_cli("--config", str(tmp_path / "gpt2.json"), "--seed", str(SEED), "--layers",
                      "1:3", "--lora", "4,8,c_attn,c_fc", "--name", "g", "--out", str(tmp_path)) == 0
    trunk = torch.jit.load(str(tmp_path / "g" / "1" / "model.pt"))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model = get_peft_model(hf_model(GPT2, SEED), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], layers_to_transform=[1, 2],
        fan_in_fan_out=True)).eval()
    loaded = peft_model.load_state_dict(
        {"base_model.model." + k: v for k, v in trunk.named_parameters()}, strict=False)
    assert not loaded.unexpected_keys
    oracle, past = Oracle(peft_model, 1, 3), []
    for new in (5, 1, 1):
        hidden = torch.randn(2, new, 64, generator=gen)
        want, want_past = oracle.step(hidden)
        with torch.no_grad():
            got, past = trunk(hidden, past)
        torch.testing.assert_close(got, want, **TOL)
        for g, w in zip(past, want_past, strict=True):
            torch.testing.assert_close(g, w, **TOL)


def test_entry_records_signature_dtype_and_limits(exported, tmp_path):
    out, models = exported
    config = (out / "gpt2" / "config.pbtxt").read_text()
    for line in ['name: "gpt2"', 'platform: "pytorch_libtorch"',
                 'input [ { name: "hidden_states" data_type: TYPE_FP32 dims: [ -1, -1, 64 ] } ]',
                 'output [ { name: "hidden_states_out" data_type: TYPE_FP32 dims: [ -1, -1, 64 ] } ]',
                 'key: "splitserve.warmup_shape" value: { string_value: "1x16x64" }',
                 'key: "splitserve.max_context" value: { string_value: "128" }',
                 'key: "splitserve.kv_shape" value: { string_value: "2x4x16" }']:
        assert line in config, line
    assert "splitserve.trainable" not in config
    assert 'key: "splitserve.trainable" value: { string_value: "true" }' in (
        out / "qwen2-lora" / "config.pbtxt").read_text()
    # bfloat16: the weights and the cache in bfloat16, float32 hidden states in and out.
    assert export_cli("--config", "qwen2-tiny-random", "--layers", "0:2", "--dtype", "bfloat16",
                      "--name", "q16", "--out", str(tmp_path)) == 0
    assert "data_type: TYPE_BF16" in (tmp_path / "q16" / "config.pbtxt").read_text()
    trunk = torch.jit.load(str(tmp_path / "q16" / "1" / "model.pt"))
    assert {p.dtype for p in trunk.parameters()} == {torch.bfloat16}
    assert trunk.inv_freq.dtype == torch.float32  # rotary positions in float32, as transformers
    with torch.no_grad():
        h, present = trunk(torch.randn(1, 3, 64), [])
        h, present = trunk(torch.randn(1, 1, 64), present)
    assert h.dtype == torch.float32 and present[0].dtype == torch.bfloat16
    assert present[0].shape == (1, 2, 4, 16)


def test_entry_is_served_from_a_model_repository(exported, pb, tmp_path):
    out, _ = exported
    shutil.copytree(out / "gpt2", tmp_path / "gpt2")
    (tmp_path / "g.json").write_text(json.dumps(GPT2))
    assert export_cli("--config", str(tmp_path / "g.json"), "--seed", str(SEED), "--layers", "1:3",
                      "--name", "gpt2s", "--kv-sessions", "--out", str(tmp_path)) == 0
    (tmp_path / "g.json").unlink()
    s = Server("--model-repository", str(tmp_path), "--device", "cpu")
    try:
        # SERVING once the repository's loads are done, failed ones included.
        s.wait_serving(timeout=30)
        stub = pb[1].ComputeServiceStub(s.channel())
        hidden, past = kv_step(stub, pb[0], "gpt2", torch.randn(1, 4, 64), [])
        assert hidden.shape == (1, 4, 64) and len(past) == 4
        # Exported with --kv-sessions: the cache stays on the server.
        step, handle = kv_step(stub, pb[0], "gpt2s", torch.randn(1, 4, 64), [])
        step, handle = kv_step(stub, pb[0], "gpt2s", torch.randn(1, 1, 64), handle)
        assert all(t.numel() == 0 and t.shape[2] == 5 for t in handle), [t.shape for t in handle]
    finally:
        s.proc.kill()
        s.proc.wait()


def test_a_session_is_bound_to_the_token_that_opened_it(exported, pb, tmp_path):
    import secrets

    out, _ = exported
    alice, bob = (f"{n}-{secrets.token_hex(16)}" for n in ("alice", "bob"))
    (tmp_path / "tokens").write_text(f"{alice} infer\n{bob} infer\n")
    s = Server("--model", f"g={out / 'gpt2' / '1' / 'model.pt'}", "--kv-sessions", "g",
               "--auth-token-file", str(tmp_path / "tokens"), "--device", "cpu")
    try:
        s.wait_serving(timeout=30)
        stub, pb2 = pb[1].ComputeServiceStub(s.channel()), pb[0]

        def step(token, hidden, past):
            data, shape = to_wire(hidden)
            entries = [pb2.KVCacheEntry(key_data=b"", key_shape=list(k.shape), value_data=b"",
                                        value_shape=list(k.shape)) for k in past[::2]]
            reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, model_id="g", use_cache=True,
                                                    past_key_values=entries),
                                 metadata=[("authorization", "Bearer " + token)], timeout=30)
            return [from_wire(e.key_data, e.key_shape) for e in reply.present_key_values for _ in (0, 1)]

        handle = step(alice, torch.randn(1, 3, 64), [])
        with pytest.raises(grpc.RpcError) as e:
            step(bob, torch.randn(1, 1, 64), handle)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        assert all(t.shape[2] == 4 for t in step(alice, torch.randn(1, 1, 64), handle))
    finally:
        s.proc.kill()
        s.proc.wait()


def test_one_file_warms_up_decodes_and_trains(exported, pb):
    """A KV trunk warms up (prefill and a decode step) and a training forward runs
    it with an empty cache: its output and the gradient a backward returns equal
    transformers' layers under autograd."""
    from test_training import backward

    out, models = exported
    first, end = LAYERS["gpt2"]
    s = Server("--model", f"gpt2={out / 'gpt2' / '1' / 'model.pt'}", "--warmup-shape", "gpt2=1x8x64",
               "--device", "cpu")
    try:
        s.wait_ok(pb)
        stub = pb[1].ComputeServiceStub(s.channel())
        gen = torch.Generator().manual_seed(11)
        hidden = torch.randn(2, 5, 64, generator=gen)
        grad = torch.randn(2, 5, 64, generator=gen)
        reply, got = compute(stub, pb[0], hidden, model_id="gpt2", training_mode=True)
        grad_in = backward(stub, pb[0], grad, reply.forward_id, model_id="gpt2")
        # The same file still decodes.
        step, past = kv_step(stub, pb[0], "gpt2", hidden, [])
        torch.testing.assert_close(step, got, **TOL)
        assert len(past) == 2 * (end - first)
    finally:
        s.proc.kill()
        s.proc.wait()
    oracle = Oracle(models["gpt2"], first, end)
    try:
        x = hidden.clone().requires_grad_(True)
        oracle.hidden = x
        models["gpt2"](input_ids=torch.zeros(2, 5, dtype=torch.long), use_cache=False)
        torch.testing.assert_close(got, oracle.out.detach(), **TOL)
        (oracle.out * grad).sum().backward()
        torch.testing.assert_close(grad_in, x.grad, **TOL)
    finally:
        oracle.close()


@pytest.mark.parametrize("args, message", [
    (["--config", "{bert}", "--layers", "0:2"],
     "unsupported architecture 'bert': splitserve-export exports gpt2, llama, qwen2"),
    (["--config", "gpt2-tiny-random", "--layers", "2:9"],
     "layer range 2:9 is out of bounds: this gpt2 model has 4 layers, so FIRST:END needs "
     "0 <= FIRST < END <= 4"),
    (["--config", "gpt2-tiny-random", "--layers", "3:3"], "layer range 3:3 is out of bounds"),
    (["--config", "gpt2-tiny-random", "--layers", "0:2", "--max-context", "2048"],
     "--max-context 2048 is past this model's maximum of 128 positions"),
    (["--config", "gpt2-tiny-random", "--layers", "0:2", "--warmup", "1x200"],
     "the warm-up context of 200 positions is past the maximum of 128"),
    (["--config", "gpt2-tiny-random", "--layers", "0:2", "--lora", "8"],
     "--lora takes r,alpha,targets"),
    (["--model", "{tmp}", "--layers", "0:2"],
     "is not a model directory (one with config.json and safetensors weights)"),
])
def test_cli_refuses_with_one_sentence(tmp_path, capsys, args, message):
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert"}))
    args = [{"{bert}": str(bert), "{tmp}": str(tmp_path)}.get(a, a) for a in args]
    assert export_cli(*args, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitserve-export: error: ") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_installed_console_script_and_module(tmp_path):
    """`make setup` installs the exporter: the console script and python -m run it."""
    script = Path(sys.executable).parent / "splitserve-export"
    assert script.is_file(), "splitserve-export is not installed: run `make setup`"
    r = subprocess.run([str(script), "--config", "gpt2-tiny-random", "--layers", "0:5",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "layer range 0:5 is out of bounds" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "splitserve_export", "--help"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "--lora" in r.stdout, r.stderr

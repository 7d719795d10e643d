"""Fine-tuning an exported LoRA trunk through the server, as splitlearn_comm
clients do it: a training Compute, then ComputeBackward with the gradient of a
loss computed client side and no learning_rate (the server's --learning-rate
applies). The oracle is peft itself: the same LoRA on the same Hugging Face
model, trained locally with torch.optim.Adam on the same data. The adapter the
server writes loads with `PeftModel.from_pretrained` and gives the trained
outputs."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import Server
from test_llm_export import QWEN2, SEED, TOL, Oracle, export_cli, hf_model
from test_training import backward, compute

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

FIRST, END = 1, 3
R, ALPHA, TARGETS = 4, 8, ["q_proj", "v_proj", "down_proj"]
STEPS, LR = 20, 0.01


def peft_qwen2():
    """The LoraConfig that `--lora R,ALPHA,TARGETS --layers FIRST:END` documents."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf_model(QWEN2, SEED), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, layers_to_transform=list(range(FIRST, END)),
        layers_pattern="layers", lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))


def trunk_forward(model, hidden: torch.Tensor) -> torch.Tensor:
    """Layers [FIRST, END) of a (peft) model on `hidden`, under autograd."""
    oracle = Oracle(model, FIRST, END)
    try:
        oracle.hidden = hidden
        model(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long), use_cache=False)
        return oracle.out
    finally:
        oracle.close()


def test_lora_trunk_trains_like_peft_and_its_adapter_loads_in_peft(pb, tmp_path):
    from peft import PeftModel

    (tmp_path / "qwen2.json").write_text(json.dumps(QWEN2))
    assert export_cli("--config", str(tmp_path / "qwen2.json"), "--seed", str(SEED), "--layers",
                      f"{FIRST}:{END}", "--lora", ",".join([str(R), str(ALPHA), *TARGETS]),
                      "--name", "q", "--out", str(tmp_path / "repo")) == 0
    exported_file = tmp_path / "repo" / "q" / "1" / "model.pt"
    exported = dict(torch.jit.load(str(exported_file)).named_parameters())

    # The oracle starts from the exported adapters (lora_A is random, lora_B zero).
    local = peft_qwen2()
    local.train()
    with torch.no_grad():
        for key, p in local.named_parameters():
            if p.requires_grad:
                p.copy_(exported[key.removeprefix("base_model.model.")])
    optimizer = torch.optim.Adam([p for p in local.parameters() if p.requires_grad], lr=LR)

    ckpt = tmp_path / "ckpt"
    # What a crash between the adapter swap's two renames leaves: the previous
    # adapter set aside, the new one half copied. The start puts the old one back.
    (ckpt / ".q.adapter.old").mkdir(parents=True)
    (ckpt / ".q.adapter.old" / "before-the-crash").write_text("")
    (ckpt / ".q.adapter.tmp").mkdir()
    s = Server("--model", f"q={exported_file}", "--warmup-shape", "q=1x8x64", "--device", "cpu",
               "--trainable", "q", "--optimizer", "adam", "--learning-rate", str(LR),
               "--checkpoint-dir", str(ckpt), "--checkpoint-every", "7")
    try:
        s.wait_ok(pb)
        assert (ckpt / "q.adapter" / "before-the-crash").is_file()
        assert not (ckpt / ".q.adapter.old").exists() and not (ckpt / ".q.adapter.tmp").exists()
        stub = pb[1].ComputeServiceStub(s.channel())
        gen = torch.Generator().manual_seed(5)
        target = torch.randn(2, 6, 64, generator=gen)
        for step in range(STEPS):
            hidden = torch.randn(2, 6, 64, generator=gen)
            # Client side: the served trunk's output, a loss, its gradient.
            reply, out = compute(stub, pb[0], hidden, model_id="q", training_mode=True)
            out.requires_grad_(True)
            loss = torch.nn.functional.mse_loss(out, target)
            loss.backward()
            backward(stub, pb[0], out.grad, reply.forward_id, model_id="q")
            # The oracle: the same step in peft and torch.optim.
            optimizer.zero_grad()
            want = torch.nn.functional.mse_loss(trunk_forward(local, hidden), target)
            want.backward()
            optimizer.step()
            assert abs(loss.item() - want.item()) < 1e-4, (step, loss.item(), want.item())
    finally:
        assert s.terminate() == 0, s.output()[-2000:]

    # Checkpoints at steps 7 and 14, and at shutdown (20): each with its adapter.
    steps = sorted(p.name for p in (ckpt / "q.ckpt").iterdir())
    assert steps == ["step-0000000007", "step-0000000014", "step-0000000020"], steps
    for step in steps:
        assert (ckpt / "q.ckpt" / step / "adapter" / "adapter_model.safetensors").is_file()

    # Base weights byte-identical; the adapters moved. The checkpoint's model.pt
    # still carries the adapter config: served again, it keeps writing adapters.
    resaved = torch.jit.load(str(ckpt / "q.ckpt" / steps[-1] / "model.pt"))
    assert resaved.peft_adapter_config() == torch.jit.load(str(exported_file)).peft_adapter_config()
    trained = dict(resaved.named_parameters())
    assert set(trained) == set(exported)
    for key, p in trained.items():
        if ".lora_" not in key:
            assert torch.equal(p, exported[key]), key
    assert not torch.equal(trained["model.layers.1.self_attn.q_proj.lora_B.default.weight"],
                           exported["model.layers.1.self_attn.q_proj.lora_B.default.weight"])

    # The adapter written at shutdown is what peft itself writes for the trained
    # model: the same keys, tensors and adapter_config.json.
    adapter = ckpt / "q.adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["q.adapter", "q.ckpt", "q.pt"]
    local.save_pretrained(str(tmp_path / "peft"))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as got, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as want:
        assert set(got.keys()) == set(want.keys())
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in got.keys()
        for key in want.keys():
            torch.testing.assert_close(got.get_tensor(key), want.get_tensor(key), **TOL)
    assert json.loads((adapter / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    # And it loads with peft onto a fresh base model and reproduces the trained
    # trunk: the oracle's outputs and the checkpoint's.
    loaded = PeftModel.from_pretrained(hf_model(QWEN2, SEED), str(adapter)).eval()
    local.eval()
    probe = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = trunk_forward(loaded, probe)
        torch.testing.assert_close(got, trunk_forward(local, probe), **TOL)
        served, _ = torch.jit.load(str(ckpt / "q.ckpt" / steps[-1] / "model.pt"))(probe, [])
        torch.testing.assert_close(got, served, **TOL)


def test_gpt2_lora_trunk_carries_the_adapter_config_peft_writes(tmp_path):
    """GPT-2's LoRA (Conv1D layers: fan_in_fan_out, layers_pattern "h"): the config
    a training server writes next to the adapters is peft's own for that LoRA; a
    plain trunk carries none."""
    from peft import LoraConfig, get_peft_model

    from test_llm_export import GPT2

    (tmp_path / "gpt2.json").write_text(json.dumps(GPT2))
    assert export_cli("--config", str(tmp_path / "gpt2.json"), "--seed", str(SEED), "--layers",
                      "1:3", "--lora", "4,8,c_attn,c_fc", "--name", "g", "--out", str(tmp_path)) == 0
    assert export_cli("--config", str(tmp_path / "gpt2.json"), "--layers", "1:3", "--name", "p",
                      "--out", str(tmp_path)) == 0
    peft_model = get_peft_model(hf_model(GPT2, SEED), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], layers_to_transform=[1, 2],
        layers_pattern="h", fan_in_fan_out=True, lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    carried = torch.jit.load(str(tmp_path / "g" / "1" / "model.pt")).peft_adapter_config()
    assert json.loads(carried) == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert torch.jit.load(str(tmp_path / "p" / "1" / "model.pt")).peft_adapter_config() == ""

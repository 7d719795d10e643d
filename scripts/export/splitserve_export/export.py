"""From a Hugging Face causal LM (a directory, or a config with seeded random
weights) to a model-repository entry: NAME/config.pbtxt and NAME/V/model.pt."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from splitserve_export import pt2, trunks

#: Architectures (transformers' model_type) and the prefix of their layers' keys.
LAYER_PREFIX = {"gpt2": "transformer.h.", "llama": "model.layers.", "qwen2": "model.layers."}

#: --format: TorchScript with the KV signature, or an AOTInductor package without a cache.
FORMATS = ("torchscript", "pt2")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Triton's data_type for each.
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}

#: Built-in configs for random weights (no download): the real models' shapes,
#: and tiny ones for tests.
BUILTINS: Dict[str, dict] = {
    "gpt2-small-random": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12,
                              n_positions=1024, vocab_size=50257),
    "gpt2-tiny-random": dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4,
                             n_positions=128, vocab_size=256, bos_token_id=0, eos_token_id=0),
    "qwen2-0.5b-random": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, max_position_embeddings=32768,
                              rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936,
                              tie_word_embeddings=True),
    "qwen2-tiny-random": dict(model_type="qwen2", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256,
                              vocab_size=256),
    "llama-tiny-random": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256,
                              vocab_size=256),
}

#: The file inside model.pt (torch.jit.save's extra files) that describes the export.
MANIFEST = "splitserve_export.json"


class ExportError(Exception):
    """A request the exporter refuses; the message is one sentence for the user."""


@dataclass
class Lora:
    r: int
    alpha: float
    targets: List[str]

    @staticmethod
    def parse(text: str) -> "Lora":
        """`r,alpha,target[,target...]`, e.g. `8,16,q_proj,v_proj` or `8,16,all-linear`."""
        parts = [p.strip() for p in text.split(",")]
        try:
            r, alpha = int(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise ExportError(
                f"--lora takes r,alpha,targets (e.g. 8,16,q_proj,v_proj), got {text[:80]!r}"
            ) from None
        targets = [t for t in parts[2:] if t]
        if r < 1 or alpha <= 0 or not targets:
            raise ExportError(
                f"--lora takes r >= 1, alpha > 0 and at least one target module, got {text[:80]!r}"
            )
        return Lora(r, alpha, targets)


@dataclass
class Request:
    """What to export. Exactly one of `model` (a model directory) and `config`
    (a built-in name or a JSON file) is set."""

    out: Path
    layers: Tuple[int, int]
    model: Optional[str] = None
    config: Optional[str] = None
    seed: int = 0
    name: Optional[str] = None
    version: int = 1
    dtype: str = "float32"
    lora: Optional[Lora] = None
    max_context: Optional[int] = None
    warmup: Tuple[int, int] = (1, 16)
    kv_sessions: bool = False
    #: "torchscript" (model.pt, the KV signature) or "pt2" (model.pt2, no cache).
    format: str = "torchscript"


def parse_layers(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ExportError(f"--layers takes FIRST:END (layers FIRST..END-1), e.g. 2:10, got {text[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def parse_warmup(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ExportError(f"--warmup takes BATCHxPOSITIONS, e.g. 1x16, got {text[:40]!r}")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------ source


def load_config(req: Request):
    """The transformers config, before any weights are built or read."""
    from transformers import AutoConfig

    if req.config is not None:
        if req.config in BUILTINS:
            spec = dict(BUILTINS[req.config])
        else:
            path = Path(req.config)
            if not path.is_file():
                raise ExportError(
                    f"--config {req.config!r} is neither a built-in config "
                    f"({', '.join(sorted(BUILTINS))}) nor a JSON file")
            try:
                spec = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ExportError(f"--config {req.config}: not a JSON file ({e})") from None
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise ExportError(f"--config {req.config}: the JSON has no model_type")
        check_architecture(model_type)
        try:
            return AutoConfig.for_model(model_type, **spec)
        except Exception as e:  # transformers' own validation
            raise ExportError(f"--config {req.config}: transformers refuses it ({e})") from None
    # A local directory only: nothing is downloaded (fetch a hub model first, e.g.
    # with `hf download`), and a typo never turns into a network wait.
    if not (Path(req.model) / "config.json").is_file():
        raise ExportError(
            f"--model {req.model[:200]} is not a model directory (one with config.json and "
            "safetensors weights)")
    try:
        return AutoConfig.from_pretrained(req.model, local_files_only=True)
    except Exception as e:
        raise ExportError(
            f"--model {req.model[:200]}: transformers cannot read its config.json "
            f"({str(e).splitlines()[0][:200]})") from None


def check_architecture(model_type: str) -> None:
    if model_type not in LAYER_PREFIX:
        raise ExportError(
            f"unsupported architecture {model_type!r}: splitserve-export exports "
            f"{', '.join(sorted(LAYER_PREFIX))}")


def build_model(req: Request, config) -> nn.Module:
    """The whole causal LM: read from the directory, or seeded random weights
    (`torch.manual_seed(seed)` then `AutoModelForCausalLM.from_config(config)`)."""
    from transformers import AutoModelForCausalLM

    if req.config is not None:
        torch.manual_seed(req.seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        # Loaded as stored (bfloat16 stays bfloat16); converted to --dtype at the end.
        model = AutoModelForCausalLM.from_pretrained(req.model, dtype="auto",
                                                     local_files_only=True)
    return model.eval()


# ------------------------------------------------------------------ checks


def max_positions(config) -> int:
    if config.model_type == "gpt2":
        return int(config.n_positions)
    return int(config.max_position_embeddings)


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def check_request(req: Request, config) -> int:
    """Validates everything that needs no weights; returns the context limit."""
    check_architecture(config.model_type)
    first, end = req.layers
    n = num_layers(config)
    if not (0 <= first < end <= n):
        raise ExportError(
            f"layer range {first}:{end} is out of bounds: this {config.model_type} model has "
            f"{n} layers, so FIRST:END needs 0 <= FIRST < END <= {n}")
    limit = max_positions(config)
    context = req.max_context if req.max_context is not None else limit
    if context < 1 or context > limit:
        raise ExportError(
            f"--max-context {context} is past this model's maximum of {limit} positions")
    if req.warmup[1] > context:
        raise ExportError(
            f"the warm-up context of {req.warmup[1]} positions is past the maximum of {context}")
    if req.dtype not in DTYPES:
        raise ExportError(f"--dtype {req.dtype!r}: use one of {', '.join(DTYPES)}")
    if req.format not in FORMATS:
        raise ExportError(f"--format {req.format[:40]!r}: use one of {', '.join(FORMATS)}")
    if req.format == "pt2" and req.lora is not None:
        raise ExportError(pt2.NO_LORA)
    if req.format == "pt2" and req.kv_sessions:
        raise ExportError(pt2.NO_KV_SESSIONS)
    if config.model_type == "gpt2":
        if getattr(config, "add_cross_attention", False):
            raise ExportError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        if getattr(config, "reorder_and_upcast_attn", False):
            raise ExportError("GPT-2 with reorder_and_upcast_attn is not supported")
        act = config.activation_function
    else:
        act = config.hidden_act
        types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in types[first:end]:
            raise ExportError(
                "sliding-window attention layers are not supported (use_sliding_window)")
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") in ("dynamic", "longrope"):
            raise ExportError(
                f"rotary scaling {rope['rope_type']!r} changes with the context and is not supported")
    if act not in trunks.ACTIVATIONS:
        raise ExportError(f"activation {act!r} is not supported ({', '.join(trunks.ACTIVATIONS)})")
    return context


# ------------------------------------------------------------------ the trunk


def apply_lora(model: nn.Module, config, req: Request):
    """peft's LoRA on the exported layers only; returns (peft model, LoraConfig)."""
    from peft import LoraConfig, get_peft_model

    lora = req.lora
    targets = lora.targets[0] if lora.targets == ["all-linear"] else lora.targets
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=list(range(*req.layers)),
        layers_pattern="h" if config.model_type == "gpt2" else "layers",
        fan_in_fan_out=config.model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ExportError(f"--lora: peft refuses the targets ({str(e).splitlines()[0][:200]})") from None
    return peft_model, cfg


def adapter_config(peft_model) -> str:
    """The adapter_config.json that `PeftModel.save_pretrained` writes for this
    LoRA, verbatim: a training server writes it next to the trained adapter, so
    that `PeftModel.from_pretrained(base_model, DIR)` puts the adapters back on the
    same layers (docs/llm.md, "LoRA: adapters out")."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        return (Path(d) / "adapter_config.json").read_text()


def lora_layers(peft_model, prefix: str, first: int, end: int):
    """{layer index: [(path inside the layer, r, scaling, adapter dtype)]} of peft's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    found: Dict[int, list] = {}
    full = "base_model.model." + prefix
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name.startswith(full):
            index, _, path = name[len(full):].partition(".")
            if "default" not in module.lora_A:
                continue
            found.setdefault(int(index), []).append((
                path, module.r["default"], float(module.scaling["default"]),
                module.lora_A["default"].weight.dtype))
    return found


def build_trunk(model: nn.Module, config, req: Request, context: int,
                lora: Optional[dict]) -> nn.Module:
    first, end = req.layers
    dtype = DTYPES[req.dtype]
    if config.model_type == "gpt2":
        width, heads = config.n_embd, config.n_head
        inner = config.n_inner if config.n_inner is not None else 4 * width
        layers = {}
        for i in range(first, end):
            hf = model.transformer.h[i]
            layers[str(i)] = trunks.GPT2Block(width, heads, inner, config.layer_norm_epsilon,
                                              config.activation_function, float(hf.attn.scaling))
        trunk = trunks.GPT2Trunk(layers, width, heads, context, dtype)
        container = trunk.transformer.h
    else:
        width = config.hidden_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or width // heads
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type == "llama" and bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        layers = {}
        for i in range(first, end):
            hf = model.model.layers[i]
            layers[str(i)] = trunks.LlamaLayer(
                width, heads, kv_heads, head_dim, config.intermediate_size, config.rms_norm_eps,
                config.hidden_act, qkv_bias, o_bias, mlp_bias, float(hf.self_attn.scaling))
        rotary = model.model.rotary_emb
        trunk = trunks.LlamaTrunk(layers, width, kv_heads, head_dim, rotary.inv_freq,
                                  float(rotary.attention_scaling), context, dtype)
        container = trunk.model.layers
    for index, wrapped in (lora or {}).items():
        for path, r, scaling, adapter_dtype in wrapped:
            trunks.wrap_lora(container[str(index)], path, r, scaling, adapter_dtype)
    return trunk


def trunk_state(model: nn.Module, prefix: str, first: int, end: int, peft: bool) -> dict:
    """The source's state-dict entries of layers [first, end), keys as they are
    (without peft's `base_model.model.` wrapper)."""
    state = model.state_dict()
    wrapper = "base_model.model." if peft else ""
    out = {}
    for key, value in state.items():
        if not key.startswith(wrapper + prefix):
            continue
        key = key[len(wrapper):]
        index = int(key[len(prefix):].split(".", 1)[0])
        if first <= index < end:
            out[key] = value
    return out


def export(req: Request) -> Path:
    """Writes the entry; returns the model file's path. Raises ExportError."""
    config = load_config(req)
    context = check_request(req, config)
    if req.version < 1:
        raise ExportError(f"--version must be >= 1, got {req.version}")
    name = req.name or config.model_type
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise ExportError(f"--name {name[:40]!r}: use letters, digits, '_', '-' and '.'")
    model = hf_model = build_model(req, config)
    first, end = req.layers
    prefix = LAYER_PREFIX[config.model_type]
    peft_config = None
    lora = None
    if req.lora is not None:
        model, peft_config = apply_lora(model, config, req)
        lora = lora_layers(model, prefix, first, end)
        if not lora:
            raise ExportError(
                f"--lora: no module of layers {first}..{end - 1} matches "
                f"{','.join(req.lora.targets)}")
    trunk = build_trunk(hf_model, config, req, context, lora)
    if lora is not None:
        trunk.adapter_config_json = adapter_config(model)
    state = trunk_state(model, prefix, first, end, peft=lora is not None)
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the {config.model_type} layers do not match the exporter's "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    weights_to_dtype(trunk, DTYPES[req.dtype])
    for pname, p in trunk.named_parameters():
        # LoRA trunks train their adapters only; a plain trunk keeps torch's default.
        p.requires_grad_(lora is None or ".lora_" in pname)
    trunk.eval()
    manifest = make_manifest(req, config, name, context, peft_config, trunk)
    entry = Path(req.out) / name
    if req.format == "pt2":
        return pt2.write(trunk, name, entry, req.version, manifest)
    scripted = torch.jit.script(trunk)
    model_file = entry / str(req.version) / "model.pt"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_file.with_name("model.pt.tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={MANIFEST: json.dumps(manifest, indent=1)})
    self_check(tmp, manifest)
    # Renamed into place: a repository rescan never sees half a file.
    os.replace(tmp, model_file)
    config_file = entry / "config.pbtxt"
    tmp = config_file.with_name("config.pbtxt.tmp")
    tmp.write_text(config_pbtxt(name, manifest))
    os.replace(tmp, config_file)
    return model_file


def weights_to_dtype(trunk: nn.Module, dtype: torch.dtype) -> None:
    """The base weights to `dtype`. LoRA adapters keep the dtype peft gave them
    (float32 under a half-precision base: peft's autocast_adapter_dtype), and the
    rotary frequencies stay float32 as in transformers (not `trunk.to(dtype)`)."""
    for pname, p in trunk.named_parameters():
        if ".lora_" not in pname:
            p.data = p.data.to(dtype)


def make_manifest(req: Request, config, name: str, context: int, peft_config,
                  trunk: nn.Module) -> dict:
    width = config.n_embd if config.model_type == "gpt2" else config.hidden_size
    lora = None
    if peft_config is not None:
        d = peft_config.to_dict()
        lora = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
                if isinstance(v, (str, int, float, bool, list, set, type(None)))}
    return {
        "name": name,
        "model_type": config.model_type,
        "source": req.model if req.model is not None else f"{req.config} seed {req.seed}",
        "layers": list(req.layers),
        "num_layers": trunk.num_layers,
        "hidden_size": width,
        "kv_heads": trunk.kv_heads,
        "head_dim": trunk.head_dim,
        "max_context": context,
        "model_max_positions": max_positions(config),
        "dtype": req.dtype,
        "warmup": list(req.warmup),
        "lora": lora,
        "kv_sessions": req.kv_sessions,
        "config": json.loads(config.to_json_string(use_diff=False)),
    }


def self_check(path: Path, manifest: dict) -> None:
    """Loads the written file back and runs a prefill and a decode step on it."""
    m = torch.jit.load(str(path))
    batch, positions = manifest["warmup"]
    width, layers = manifest["hidden_size"], manifest["num_layers"]
    positions = min(positions, manifest["max_context"] - 1) or 1
    with torch.no_grad():
        h, present = m(torch.zeros(batch, positions, width), [])
        if positions + 1 <= manifest["max_context"]:
            h, present = m(torch.zeros(batch, 1, width), present)
    if len(present) != 2 * layers or tuple(h.shape[:2]) not in ((batch, 1), (batch, positions)):
        raise ExportError("the written model does not run its own warm-up (please report this)")


def config_pbtxt(name: str, m: dict) -> str:
    t = TRITON_TYPES[m["dtype"]]
    w = m["hidden_size"]
    first, end = m["layers"]
    params = {
        "splitserve.warmup_shape": f"{m['warmup'][0]}x{m['warmup'][1]}x{w}",
        "splitserve.max_context": str(m["max_context"]),
        "splitserve.kv_shape": f"{m['num_layers']}x{m['kv_heads']}x{m['head_dim']}",
    }
    if m["lora"] is not None:
        params["splitserve.trainable"] = "true"
    if m.get("kv_sessions"):
        params["splitserve.kv_sessions"] = "true"
    lines = [
        f"# splitserve-export: layers {first}..{end - 1} of {m['source']} ({m['model_type']}), "
        f"{m['dtype']}.",
        "# forward(hidden, past: List[Tensor]) -> (hidden, present): past and present are",
        "# [key_0, value_0, key_1, ...], each [batch, kv_heads, positions, head_dim]; the",
        "# ComputeService carries them as past_key_values / present_key_values.",
        f'name: "{name}"',
        'platform: "pytorch_libtorch"',
        "max_batch_size: 0",
        f'input [ {{ name: "hidden_states" data_type: {t} dims: [ -1, -1, {w} ] }} ]',
        f'output [ {{ name: "hidden_states_out" data_type: {t} dims: [ -1, -1, {w} ] }} ]',
    ]
    for k, v in params.items():
        lines.append(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"

"""Decoder layers written for torch.jit.script, holding a Hugging Face model's
weights under the same state-dict names.

Why not trace transformers' own layers: a trace freezes every Python value it
meets, and a KV step is full of them. The past length becomes a constant in the
rotary positions and the causal mask, SDPA's `is_causal` is a Python bool chosen
from the query length (true for a prefill, false for one new token), the empty
first past takes another code path than a non-empty one, and the Cache object
cannot cross the trace boundary at all. Scripting transformers' modules fails
too (Cache objects, **kwargs, decorators). So the forward is written here, over
plain tensors, once: the past length, the mask and the positions are computed
from the tensors at run time, and an empty past (the prefill) is an ordinary
case of the same code. The arithmetic follows transformers' eager attention op
for op (GPT-2: `eager_attention_forward` of modeling_gpt2; Llama and Qwen2:
`eager_attention_forward`, `apply_rotary_pos_emb`, `repeat_kv`, the RMSNorm),
and the tests hold it to transformers' own layers.

The modules mirror transformers' attribute names (`transformer.h.N.attn.c_attn`,
`model.layers.N.self_attn.q_proj`, ...), and LoRA layers mirror peft's
(`q_proj.base_layer`, `q_proj.lora_A.default`, `q_proj.lora_B.default`), so the
trunk's state dict is the source model's (or peft model's) state dict restricted
to the exported layers, key for key.
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activation(x: Tensor, kind: str) -> Tensor:
    """transformers' ACT2FN for the names these architectures use."""
    if kind == "gelu_new" or kind == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    if kind == "silu" or kind == "swish":
        return F.silu(x)
    if kind == "relu":
        return F.relu(x)
    raise RuntimeError("unsupported activation " + kind)


#: The activation names `activation` implements.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "swish", "relu")


class Conv1D(nn.Module):
    """GPT-2's linear layer with a transposed weight ([in, out]), as transformers' Conv1D."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        # list(): in eager Python (torch.export) size() is a tuple, not a List[int].
        size_out = list(x.size()[:-1]) + [self.nf]
        x = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class LoraLinear(nn.Module):
    """peft's lora.Linear for one adapter named `default`, dropout 0:
    base(x) + lora_B(lora_A(x)) * scaling, in the base layer's dtype."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int,
                 scaling: float, adapter_dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict(
            {"default": nn.Linear(in_features, r, bias=False, dtype=adapter_dtype)})
        self.lora_B = nn.ModuleDict(
            {"default": nn.Linear(r, out_features, bias=False, dtype=adapter_dtype)})
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        a = self.lora_A["default"]
        b = self.lora_B["default"]
        lora = b(a(x.to(a.weight.dtype))) * self.scaling
        return (result + lora).to(result.dtype)


class Holder(nn.Module):
    """A named level of the state dict (`transformer`, `model`); it has no forward."""


def causal_mask(past_len: int, new: int, device: torch.device) -> Tensor:
    """[new, past_len + new], True where a query may not see a key: query t sits
    at position past_len + t and sees keys 0..past_len + t."""
    q = torch.arange(past_len, past_len + new, device=device)
    k = torch.arange(0, past_len + new, device=device)
    return k.unsqueeze(0) > q.unsqueeze(1)


def decode_rows(q: Tensor, k: Tensor, v: Tensor, caches: List[Tensor], layer: int, stride: int,
                lengths: List[int], scaling: float, groups: int, float32_softmax: bool) -> Tensor:
    """Attention of one new position per row, each row over its own cache.

    Row b's key and value cache for this layer are `caches[b * stride + 2 * layer]`
    and the next entry, `[1, kv heads, capacity, head dim]` with capacity >
    lengths[b]: the new key and value are written in place at position
    lengths[b], and the row attends to positions 0..lengths[b] of its own cache,
    a view (no copy, no padding: no row ever sees another row's positions or a
    padded one). q, k, v: [B, heads or kv heads, 1, head dim]. One new query
    sees every position before it, so no mask is needed. Returns [B, heads, 1,
    head dim]."""
    outs: List[Tensor] = []
    for b in range(q.size(0)):
        n = lengths[b]
        ck = caches[b * stride + 2 * layer]
        cv = caches[b * stride + 2 * layer + 1]
        ck.narrow(2, n, 1).copy_(k[b:b + 1])
        cv.narrow(2, n, 1).copy_(v[b:b + 1])
        keys = ck.narrow(2, 0, n + 1)[0]
        values = cv.narrow(2, 0, n + 1)[0]
        kv_heads, dim = keys.size(0), keys.size(2)
        # Query head h reads kv head h // groups (repeat_kv's order), without
        # repeating the cache: [kv heads, groups, dim] @ [kv heads, dim, n + 1].
        qb = q[b].reshape(kv_heads, groups, dim)
        w = torch.matmul(qb, keys.transpose(1, 2)) * scaling
        if float32_softmax:
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            w = F.softmax(w, dim=-1).type(values.dtype)
        outs.append(torch.matmul(w, values).reshape(1, kv_heads * groups, 1, dim))
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------- GPT-2


class GPT2Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, scaling: float) -> None:
        super().__init__()
        self.c_attn = Conv1D(3 * hidden, hidden)
        self.c_proj = Conv1D(hidden, hidden)
        self.split_size = hidden
        self.head_dim = hidden // heads
        self.scaling = scaling

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor,
                mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        batch, new = x.size(0), x.size(1)
        qkv = self.c_attn(x).split(self.split_size, dim=2)
        q = qkv[0].view(batch, new, -1, self.head_dim).transpose(1, 2)
        k = qkv[1].view(batch, new, -1, self.head_dim).transpose(1, 2)
        v = qkv[2].view(batch, new, -1, self.head_dim).transpose(1, 2)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        w = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        w = w.masked_fill(mask, float("-inf"))
        w = F.softmax(w, dim=-1).type(v.dtype)
        out = torch.matmul(w, v).transpose(1, 2)
        out = out.reshape(batch, new, -1).contiguous()
        return self.c_proj(out), k, v

    def decode(self, x: Tensor, caches: List[Tensor], layer: int, stride: int,
               lengths: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
        """One new position for each of B rows, each with its own cache (see
        `decode_rows`): the projections run once for all rows."""
        batch = x.size(0)
        qkv = self.c_attn(x).split(self.split_size, dim=2)
        q = qkv[0].view(batch, 1, -1, self.head_dim).transpose(1, 2)
        k = qkv[1].view(batch, 1, -1, self.head_dim).transpose(1, 2)
        v = qkv[2].view(batch, 1, -1, self.head_dim).transpose(1, 2)
        out = decode_rows(q, k, v, caches, layer, stride, lengths, self.scaling, 1, False)
        out = out.transpose(1, 2).reshape(batch, 1, -1).contiguous()
        return self.c_proj(out), k, v


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str) -> None:
        super().__init__()
        self.c_fc = Conv1D(inner, hidden)
        self.c_proj = Conv1D(hidden, inner)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(activation(self.c_fc(x), self.act))


class GPT2Block(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float, act: str,
                 scaling: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hidden, heads, scaling)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, inner, act)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor,
                cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn(self.ln_1(x), past_k, past_v, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v

    def decode(self, x: Tensor, caches: List[Tensor], layer: int, stride: int,
               lengths: List[int], cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn.decode(self.ln_1(x), caches, layer, stride, lengths)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


# ------------------------------------------------------- Llama, Qwen2


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    batch, heads, length, dim = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x[:, :, None, :, :].expand(batch, heads, groups, length, dim)
    return x.reshape(batch, heads * groups, length, dim)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 qkv_bias: bool, o_bias: bool, scaling: float) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.head_dim = head_dim
        self.groups = heads // kv_heads
        self.scaling = scaling

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor,
                cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        batch, new = x.size(0), x.size(1)
        q = self.q_proj(x).view(batch, new, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, new, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, new, -1, self.head_dim).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        w = torch.matmul(q, repeat_kv(k, self.groups).transpose(2, 3)) * self.scaling
        w = w.masked_fill(mask, float("-inf"))
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, repeat_kv(v, self.groups)).transpose(1, 2).contiguous()
        out = out.reshape(batch, new, -1).contiguous()
        return self.o_proj(out), k, v

    def decode(self, x: Tensor, caches: List[Tensor], layer: int, stride: int,
               lengths: List[int], cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One new position for each of B rows (see `decode_rows`); `cos` and
        `sin` are each row's rotary angles, [B, 1, 1, head dim]."""
        batch = x.size(0)
        q = self.q_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        out = decode_rows(q, k, v, caches, layer, stride, lengths, self.scaling, self.groups,
                          True)
        out = out.transpose(1, 2).reshape(batch, 1, -1).contiguous()
        return self.o_proj(out), k, v


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, bias: bool, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activation(self.gate_proj(x), self.act) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inner: int,
                 eps: float, act: str, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 scaling: float) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, head_dim, qkv_bias, o_bias,
                                        scaling)
        self.mlp = LlamaMLP(hidden, inner, mlp_bias, act)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor,
                cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(x), past_k, past_v, mask, cos, sin)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v

    def decode(self, x: Tensor, caches: List[Tensor], layer: int, stride: int,
               lengths: List[int], cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn.decode(self.input_layernorm(x), caches, layer, stride, lengths,
                                        cos, sin)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


# ---------------------------------------------------------------- trunks


def check_step(hidden: Tensor, past: List[Tensor], layers: int, width: int, kv_heads: int,
               head_dim: int, max_positions: int) -> int:
    """The past length, after checking the request against the trunk: clear
    messages (they reach the client) instead of an operator's shape error."""
    if hidden.dim() != 3 or hidden.size(2) != width:
        raise RuntimeError(
            "hidden must be [batch, positions, {}], got {}".format(width, hidden.size()))
    if len(past) != 0 and len(past) != 2 * layers:
        raise RuntimeError(
            "past has {} tensors; this trunk of {} layers takes none (the first step) or {} "
            "(a key and a value per layer)".format(len(past), layers, 2 * layers))
    past_len = 0
    if len(past) > 0:
        past_len = past[0].size(2) if past[0].dim() == 4 else -1
    for t in past:
        if (t.dim() != 4 or t.size(0) != hidden.size(0) or t.size(1) != kv_heads
                or t.size(2) != past_len or t.size(3) != head_dim):
            raise RuntimeError(
                "every past key and value must be [{}, {}, {}, {}] (batch, kv heads, past "
                "positions, head dim), got {}".format(
                    hidden.size(0), kv_heads, past_len, head_dim, t.size()))
    total = past_len + hidden.size(1)
    if total > max_positions:
        raise RuntimeError(
            "a context of {} positions is past this model's maximum of {}".format(
                total, max_positions))
    return past_len


def check_decode(hidden: Tensor, caches: List[Tensor], lengths: List[int], layers: int,
                 width: int, kv_heads: int, head_dim: int, max_positions: int,
                 dtype: torch.dtype) -> None:
    """Checks a batched decode step before anything is computed or written."""
    if hidden.dim() != 3 or hidden.size(1) != 1 or hidden.size(2) != width:
        raise RuntimeError(
            "hidden must be [rows, 1, {}] for a batched decode step, got {}".format(
                width, hidden.size()))
    rows = hidden.size(0)
    if len(lengths) != rows or len(caches) != rows * 2 * layers:
        raise RuntimeError(
            "a batched decode step of {} rows takes {} lengths and {} cache tensors, got {} "
            "and {}".format(rows, rows, rows * 2 * layers, len(lengths), len(caches)))
    for b in range(rows):
        n = lengths[b]
        if n < 0 or n + 1 > max_positions:
            raise RuntimeError(
                "a context of {} positions is past this model's maximum of {}".format(
                    n + 1, max_positions))
        for i in range(2 * layers):
            t = caches[b * 2 * layers + i]
            if (t.dim() != 4 or t.size(0) != 1 or t.size(1) != kv_heads or t.size(2) <= n
                    or t.size(3) != head_dim or t.dtype != dtype):
                raise RuntimeError(
                    "every cache of a batched decode step must be [1, {}, capacity > length, "
                    "{}] in the trunk's dtype, got {} for a row of length {}".format(
                        kv_heads, head_dim, t.size(), n))


class Trunk(nn.Module):
    """What every trunk carries besides its layers: for a LoRA trunk, peft's
    adapter_config.json (the text `PeftModel.save_pretrained` writes for the
    exporter's LoraConfig), which a training server copies next to the adapter
    weights it writes (docs/llm.md, "LoRA: adapters out"); "" otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter_config_json = ""

    @torch.jit.export
    def peft_adapter_config(self) -> str:
        return self.adapter_config_json


class GPT2Trunk(Trunk):
    """GPT-2 blocks [first, last): the trunk of a split GPT-2 (the client keeps the
    token and position embeddings, ln_f and the head)."""

    def __init__(self, blocks: Dict[str, nn.Module], width: int, heads: int,
                 max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.transformer = Holder()
        self.transformer.h = nn.ModuleDict(blocks)
        self.num_layers = len(blocks)
        self.width = width
        self.kv_heads = heads
        self.head_dim = width // heads
        self.max_positions = max_positions
        self.dtype = dtype

    def forward(self, hidden: Tensor, past: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        past_len = check_step(hidden, past, self.num_layers, self.width, self.kv_heads,
                              self.head_dim, self.max_positions)
        x = hidden.to(self.dtype)
        mask = causal_mask(past_len, x.size(1), x.device)
        empty = x.new_zeros([x.size(0), self.kv_heads, 0, self.head_dim])
        unused = x.new_zeros([0])
        present: List[Tensor] = []
        i = 0
        for block in self.transformer.h.values():
            if len(past) > 0:
                pk, pv = past[2 * i].to(self.dtype), past[2 * i + 1].to(self.dtype)
            else:
                pk, pv = empty, empty
            x, k, v = block(x, pk, pv, mask, unused, unused)
            present.append(k)
            present.append(v)
            i += 1
        return x.to(hidden.dtype), present

    @torch.jit.export
    def decode_batch(self, hidden: Tensor, caches: List[Tensor],
                     lengths: List[int]) -> Tuple[Tensor, List[Tensor]]:
        """One decode step for B sequences at once, each with its own past length.

        hidden: [B, 1, width]. caches: row b's `[key_0, value_0, key_1, ...]` at
        `caches[b * 2 * layers:]`, each `[1, kv heads, capacity, head dim]` in the
        trunk's dtype, holding lengths[b] valid positions and room for one more.
        The new key and value of each row and layer are written into its cache at
        position lengths[b] (in place); the weights are read once for all rows.
        Returns the hidden states [B, 1, width] and the new entries
        `[key_0, value_0, ...]`, each [B, kv heads, 1, head dim]."""
        check_decode(hidden, caches, lengths, self.num_layers, self.width, self.kv_heads,
                     self.head_dim, self.max_positions, self.dtype)
        x = hidden.to(self.dtype)
        unused = x.new_zeros([0])
        stride = 2 * self.num_layers
        new: List[Tensor] = []
        i = 0
        for block in self.transformer.h.values():
            x, k, v = block.decode(x, caches, i, stride, lengths, unused, unused)
            new.append(k)
            new.append(v)
            i += 1
        return x.to(hidden.dtype), new


class LlamaTrunk(Trunk):
    """Llama-family decoder layers [first, last) (Llama, Qwen2): RMSNorm, rotary
    positions that continue from the past length, grouped-query attention."""

    def __init__(self, layers: Dict[str, nn.Module], width: int, kv_heads: int,
                 head_dim: int, inv_freq: Tensor, attention_scaling: float,
                 max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = Holder()
        self.model.layers = nn.ModuleDict(layers)
        # transformers keeps it out of the state dict too (a non-persistent buffer).
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        self.attention_scaling = attention_scaling
        self.num_layers = len(layers)
        self.width = width
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype

    def forward(self, hidden: Tensor, past: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        past_len = check_step(hidden, past, self.num_layers, self.width, self.kv_heads,
                              self.head_dim, self.max_positions)
        x = hidden.to(self.dtype)
        new = x.size(1)
        mask = causal_mask(past_len, new, x.device)
        # Qwen2RotaryEmbedding.forward, for positions past_len .. past_len + new - 1.
        positions = torch.arange(past_len, past_len + new, device=x.device).to(torch.float32)
        freqs = positions.unsqueeze(1) * self.inv_freq.to(x.device).unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)
        empty = x.new_zeros([x.size(0), self.kv_heads, 0, self.head_dim])
        present: List[Tensor] = []
        i = 0
        for layer in self.model.layers.values():
            if len(past) > 0:
                pk, pv = past[2 * i].to(self.dtype), past[2 * i + 1].to(self.dtype)
            else:
                pk, pv = empty, empty
            x, k, v = layer(x, pk, pv, mask, cos, sin)
            present.append(k)
            present.append(v)
            i += 1
        return x.to(hidden.dtype), present

    @torch.jit.export
    def decode_batch(self, hidden: Tensor, caches: List[Tensor],
                     lengths: List[int]) -> Tuple[Tensor, List[Tensor]]:
        """One decode step for B sequences at once (as GPT2Trunk.decode_batch);
        each row's rotary position is its own past length."""
        check_decode(hidden, caches, lengths, self.num_layers, self.width, self.kv_heads,
                     self.head_dim, self.max_positions, self.dtype)
        x = hidden.to(self.dtype)
        positions = torch.tensor(lengths, dtype=torch.float32, device=x.device)
        freqs = positions.unsqueeze(1) * self.inv_freq.to(x.device).unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        rows = x.size(0)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype).view(rows, 1, 1, -1)
        sin = (emb.sin() * self.attention_scaling).to(x.dtype).view(rows, 1, 1, -1)
        stride = 2 * self.num_layers
        new: List[Tensor] = []
        i = 0
        for layer in self.model.layers.values():
            x, k, v = layer.decode(x, caches, i, stride, lengths, cos, sin)
            new.append(k)
            new.append(v)
            i += 1
        return x.to(hidden.dtype), new


def wrap_lora(layer: nn.Module, path: str, r: int, scaling: float,
              adapter_dtype: torch.dtype) -> None:
    """Replaces the linear or Conv1D at `path` inside `layer` (`self_attn.q_proj`)
    with a LoraLinear around it, as peft does."""
    *parents, name = path.split(".")
    parent = layer
    for p in parents:
        parent = getattr(parent, p)
    base = getattr(parent, name)
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape
    elif isinstance(base, nn.Linear):
        out_features, in_features = base.weight.shape
    else:
        raise TypeError(f"{path} is a {type(base).__name__}, not a linear layer")
    setattr(parent, name, LoraLinear(base, in_features, out_features, r, scaling, adapter_dtype))

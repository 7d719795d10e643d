"""Split LLM decoding against splitserve: this process holds the token
embeddings, the layers before the trunk, the layers after it, the final norm
and the LM head; splitserve holds the trunk (decoder layers FIRST..END-1).

    splitserve-export --config gpt2-tiny-random --seed 0 --layers 1:3 --out models
    target/release/splitserve serve --model gpt2=models/gpt2/1/model.pt --kv-sessions gpt2 &
    .venv/bin/python examples/split_llm.py --config gpt2-tiny-random --seed 0 --layers 1:3 \\
        --model-id gpt2 --tokens 20 --check

Greedy decoding of token ids with splitlearn_comm's loop, unchanged: each step
sends the new positions' hidden states with use_cache=True and, as
past_key_values, exactly the present_key_values of the last reply, without
looking inside. Without --kv-sessions that is the trunk's whole cache (the
bytes per step grow with the context); with it, a small handle (the cache
stays on the server, the bytes per step stay flat). The weights are random,
from a config and a seed (`torch.manual_seed(SEED)` then
`AutoModelForCausalLM.from_config`, as splitserve-export builds them), so
nothing is downloaded and no tokenizer is needed. --check compares the tokens
with the unsplit transformers model's generate() (greedy).

A session lives in one server process. If a step's handle is one the server
does not hold (another pod behind the Service, a restart, an eviction) the
server answers FAILED_PRECONDITION "restart decoding from the prompt"; this
client then re-sends the whole sequence so far as a new prompt (--no-restart:
it stops with the error instead). tests/python/test_split_llm.py runs this file
against the real binary.
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_training import from_wire, load_stubs, to_wire  # noqa: E402  (the wire codec)


def exporter():
    """splitserve_export (scripts/export): this checkout's copy first."""
    here = ROOT / "scripts" / "export"
    if here.is_dir() and str(here) not in sys.path:
        sys.path.insert(0, str(here))
    import importlib

    return importlib.import_module("splitserve_export.export")


class ClientModel:
    """The client's parts of a causal LM built from a config and a seed: the
    embeddings, layers [0, first) and [end, n) (run locally with their own KV
    caches, by splitserve-export's forward, which its tests hold equal to
    transformers'), the final norm and the LM head."""

    def __init__(self, config: str, seed: int, first: int, end: int):
        ex = exporter()
        req = ex.Request(out=Path("."), layers=(first, end), config=config, seed=seed)
        self.config = ex.load_config(req)
        context = ex.check_request(req, self.config)  # the same range checks as the exporter
        self.model = ex.build_model(req, self.config)  # the whole model, seeded as exported
        self.max_positions = context
        self.gpt2 = self.config.model_type == "gpt2"
        n = ex.num_layers(self.config)
        self.bottom = self._layers(ex, 0, first, context)
        self.top = self._layers(ex, end, n, context)

    def _layers(self, ex, a: int, b: int, context: int):
        """Layers [a, b) with the exporter's forward and the model's weights; None if empty."""
        if a == b:
            return None
        req = ex.Request(out=Path("."), layers=(a, b), config="local")
        part = ex.build_trunk(self.model, self.config, req, context, None)
        state = ex.trunk_state(self.model, ex.LAYER_PREFIX[self.config.model_type], a, b, False)
        part.load_state_dict(state)
        # The exporter's forward is written for TorchScript (it is what the server runs).
        return torch.jit.script(part.eval())

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, past_len: int) -> torch.Tensor:
        if self.gpt2:
            t = self.model.transformer
            positions = torch.arange(past_len, past_len + ids.shape[1]).unsqueeze(0)
            return t.wte(ids) + t.wpe(positions)
        return self.model.model.embed_tokens(ids)

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.model.transformer.ln_f if self.gpt2 else self.model.model.norm
        return self.model.lm_head(norm(hidden))


def kv_step(stub, pb2, model_id: str, hidden: torch.Tensor, past: List[torch.Tensor],
            timeout: float = 30):
    """One Compute as splitlearn_comm's compute_with_cache sends it: float32 raw
    bytes, use_cache, the last reply's present_key_values entry for entry.
    Returns (hidden, present, request bytes, reply bytes)."""
    entries = []
    for k, v in zip(past[::2], past[1::2]):
        kd, ks = to_wire(k)
        vd, vs = to_wire(v)
        entries.append(pb2.KVCacheEntry(key_data=kd, key_shape=ks, value_data=vd, value_shape=vs))
    data, shape = to_wire(hidden)
    request = pb2.ComputeRequest(data=data, shape=shape, model_id=model_id, use_cache=True,
                                 past_key_values=entries)
    reply = stub.Compute(request, timeout=timeout)
    present = []
    for e in reply.present_key_values:
        present += [from_wire(e.key_data, e.key_shape), from_wire(e.value_data, e.value_shape)]
    return from_wire(reply.data, reply.shape), present, request.ByteSize(), reply.ByteSize()


@dataclass
class Step:
    token: int
    #: Positions the trunk held before this step (the context it attended to).
    past: int
    #: Positions sent in this step (the prompt, or 1).
    new: int
    ms: float
    sent: int
    received: int


@dataclass
class Generation:
    tokens: List[int] = field(default_factory=list)
    steps: List[Step] = field(default_factory=list)
    #: FAILED_PRECONDITION answers after which decoding restarted from the prompt.
    restarts: int = 0


def generate(stub, pb2, client: ClientModel, model_id: str, prompt: List[int], max_new_tokens: int,
             restart: bool = True, log: Callable[[str], None] = print,
             timeout: float = 30) -> Generation:
    """Greedy decoding: max_new_tokens tokens after `prompt` (batch 1; no stop
    at an end-of-sequence token)."""
    if not prompt or len(prompt) + max_new_tokens - 1 > client.max_positions:
        raise ValueError(f"the prompt ({len(prompt)}) plus {max_new_tokens} tokens must fit "
                         f"this model's {client.max_positions} positions")
    out = Generation()
    ids = list(prompt)
    new = list(prompt)
    bottom_past: List[torch.Tensor] = []
    trunk_past: List[torch.Tensor] = []
    top_past: List[torch.Tensor] = []
    while len(out.tokens) < max_new_tokens:
        started = time.perf_counter()
        past_len = len(ids) - len(new)
        with torch.no_grad():
            h = client.embed(torch.tensor([new]), past_len)
            if client.bottom is not None:
                h, bottom_past_next = client.bottom(h, bottom_past)
            try:
                h, trunk_past, sent, received = kv_step(stub, pb2, model_id, h, trunk_past, timeout)
            except grpc.RpcError as e:
                if not (restart and e.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and out.restarts < 3):
                    raise
                # The session is gone (another pod, a restart, an eviction): the
                # whole sequence so far becomes the prompt of a new one.
                log(f"server: {e.details()}; restarting from the prompt ({len(ids)} tokens)")
                out.restarts += 1
                new, bottom_past, trunk_past, top_past = list(ids), [], [], []
                continue
            if client.bottom is not None:
                bottom_past = bottom_past_next
            if client.top is not None:
                h, top_past = client.top(h, top_past)
            token = int(client.head(h[:, -1]).argmax(-1)[0])
        ms = (time.perf_counter() - started) * 1000
        step = Step(token, past_len, len(new), ms, sent, received)
        out.tokens.append(token)
        out.steps.append(step)
        log(f"token {token:6d}  context {past_len + len(new):5d}  {ms:8.2f} ms  "
            f"sent {sent:9d} B  received {received:9d} B")
        ids.append(token)
        new = [token]
    return out


def unsplit_generate(client: ClientModel, prompt: List[int], max_new_tokens: int) -> List[int]:
    """The whole transformers model's greedy generate() (no stop at EOS)."""
    model = client.model
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens)
    return full[0, len(prompt):].tolist()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--model-id", default="gpt2",
                        help="the trunk's served name (splitserve serve --model NAME=...)")
    parser.add_argument("--config", default="gpt2-tiny-random",
                        help="the config the trunk was exported from (built-in name or JSON file)")
    parser.add_argument("--seed", type=int, default=0, help="the export's --seed")
    parser.add_argument("--layers", default="1:3", help="the export's --layers FIRST:END")
    parser.add_argument("--prompt", default="1,2,3,4,5,6,7,8", help="token ids, comma-separated")
    parser.add_argument("--tokens", type=int, default=20, help="tokens to generate")
    parser.add_argument("--no-restart", action="store_true",
                        help="stop on FAILED_PRECONDITION instead of restarting from the prompt")
    parser.add_argument("--check", action="store_true",
                        help="compare with the unsplit model's generate()")
    args = parser.parse_args(argv)
    ex = exporter()
    try:
        first, end = ex.parse_layers(args.layers)
        client = ClientModel(args.config, args.seed, first, end)
    except ex.ExportError as e:
        print(f"split_llm: error: {e}", file=sys.stderr)
        return 2
    prompt = [int(t) for t in args.prompt.split(",") if t.strip()]
    pb2, pb2_grpc = load_stubs()
    stub = pb2_grpc.ComputeServiceStub(grpc.insecure_channel(args.addr))
    try:
        gen = generate(stub, pb2, client, args.model_id, prompt, args.tokens,
                       restart=not args.no_restart)
    except grpc.RpcError as e:
        print(f"split_llm: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print("tokens:", " ".join(map(str, gen.tokens)))
    decode = gen.steps[1:] or gen.steps
    print(f"decode steps: {sum(s.ms for s in decode) / len(decode):.2f} ms/token, bytes per step "
          f"{decode[0].sent + decode[0].received} at context {decode[0].past + 1}, "
          f"{decode[-1].sent + decode[-1].received} at context {decode[-1].past + 1}"
          + (f"; {gen.restarts} restart(s) from the prompt" if gen.restarts else ""))
    if args.check:
        want = unsplit_generate(client, prompt, args.tokens)
        if want != gen.tokens:
            print("unsplit generate() differs:", " ".join(map(str, want)), file=sys.stderr)
            return 1
        print("equal to the unsplit model's generate()")
    return 0


if __name__ == "__main__":
    sys.exit(main())

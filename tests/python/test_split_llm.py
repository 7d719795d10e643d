"""examples/split_llm.py (docs/llm.md): greedy decoding of a split LLM through the
real binary, the client holding the embeddings, the layers around the trunk and
the head, with splitlearn_comm's unchanged loop. The oracle is the unsplit
transformers model's generate(). With KV sessions the bytes per decode step
stay flat; a session lives in one process: a connection that rotates
(--max-connection-age) keeps it, a step that reaches another server gets the
documented FAILED_PRECONDITION, never a wrong token. Tiny configs keep it fast."""

import json
import sys
import time

import grpc
import pytest
import torch

from conftest import ROOT, Server

sys.path.insert(0, str(ROOT / "examples"))
import split_llm  # noqa: E402  (examples/split_llm.py)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

TOKENS = 20
PROMPT = [5, 17, 99, 3, 250, 42, 7]
#: Weights ten times the default scale: distinct tokens, not one repeated.
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, n_positions=128,
                 vocab_size=256, bos_token_id=0, eos_token_id=0, initializer_range=0.2),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  vocab_size=256, initializer_range=0.2),
}
SEED = 11
#: The server's trunk; the client keeps layer 0 and layer 3.
LAYERS = (1, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The exported trunks, the client sides and the unsplit generate() tokens."""
    tmp = tmp_path_factory.mktemp("split-llm")
    ex = split_llm.exporter()
    clients, want = {}, {}
    for name, spec in CONFIGS.items():
        config = tmp / f"{name}.json"
        config.write_text(json.dumps(spec))
        ex.export(ex.Request(out=tmp / "repo", layers=LAYERS, config=str(config), seed=SEED,
                             name=name))
        clients[name] = split_llm.ClientModel(str(config), SEED, *LAYERS)
        want[name] = split_llm.unsplit_generate(clients[name], PROMPT, TOKENS)
        assert len(set(want[name])) > 3, f"{name}: a degenerate oracle {want[name]}"
    return tmp / "repo", clients, want


def serve(repo, *extra: str) -> Server:
    """Each trunk as NAME (the client's cache crosses the wire) and NAMEs (KV sessions)."""
    args = []
    for name in CONFIGS:
        model = repo / name / "1" / "model.pt"
        args += ["--model", f"{name}={model}", "--model", f"{name}s={model}"]
    return Server(*args, "--device", "cpu", "--kv-sessions", ",".join(f"{n}s" for n in CONFIGS),
                  *extra)


@pytest.fixture(scope="module")
def server(setup, pb):
    s = serve(setup[0])
    try:
        s.wait_ok(pb)
        yield s
    finally:
        s.proc.kill()
        s.proc.wait()


def quiet(_line: str) -> None:
    pass


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_decoding_equals_unsplit_generate_with_and_without_sessions(setup, server, pb, name):
    _, clients, want = setup
    stub = pb[1].ComputeServiceStub(server.channel())
    steps_before = server.metric("splitserve_kv_decode_steps_total") or 0
    plain = split_llm.generate(stub, pb[0], clients[name], name, PROMPT, TOKENS, log=quiet)
    kept = split_llm.generate(stub, pb[0], clients[name], name + "s", PROMPT, TOKENS, log=quiet)
    assert plain.tokens == want[name]
    assert kept.tokens == want[name]
    assert plain.restarts == kept.restarts == 0
    # Without sessions the whole cache crosses the wire both ways, growing with
    # the context; with them, a handle: the bytes of a decode step stay flat.
    step = lambda s: s.sent + s.received  # noqa: E731
    plain_bytes = [step(s) for s in plain.steps[1:]]
    kept_bytes = [step(s) for s in kept.steps[1:]]
    assert plain_bytes[-1] > 2 * plain_bytes[0], plain_bytes
    assert max(kept_bytes) <= min(kept_bytes) + 16, kept_bytes
    assert max(kept_bytes) < plain_bytes[0] / 10, (kept_bytes, plain_bytes)
    # The server counted the session's decode steps (every step after the prompt).
    assert server.metric("splitserve_kv_decode_steps_total") - steps_before == TOKENS - 1


def test_the_example_runs_as_a_script(setup, server, capsys):
    """Its command line, in this process (no second transformers import)."""
    repo, _, want = setup
    config = repo.parent / "gpt2.json"
    rc = split_llm.main(["--addr", server.addr, "--model-id", "gpt2s", "--config", str(config),
                         "--seed", str(SEED), "--layers", "1:3", "--tokens", str(TOKENS),
                         "--prompt", ",".join(map(str, PROMPT)), "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"tokens: {' '.join(map(str, want['gpt2']))}" in out
    assert "equal to the unsplit model's generate()" in out
    assert out.count(" ms  sent ") == TOKENS
    # The served name is the model_id: another name is refused, naming the served ones.
    rc = split_llm.main(["--addr", server.addr, "--model-id", "gpt-2", "--config", str(config),
                         "--seed", str(SEED), "--tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("split_llm: NOT_FOUND") and "gpt2" in err, err


class Slow:
    """A stub that waits before each step, so a generation outlives connections."""

    def __init__(self, stub, pause: float):
        self.stub, self.pause = stub, pause

    def Compute(self, request, timeout=None):  # noqa: N802 (the stub's name)
        time.sleep(self.pause)
        return self.stub.Compute(request, timeout=timeout)


def test_a_rotating_connection_keeps_its_session(setup, pb):
    """--max-connection-age sends GOAWAY mid-generation; the client reconnects to
    the same process (one pod), which still holds the session: same tokens, no
    restart, and the server saw the connections rotate."""
    repo, clients, want = setup
    s = serve(repo, "--max-connection-age", "1s", "--max-connection-age-grace", "10s")
    try:
        s.wait_ok(pb)
        stub = Slow(pb[1].ComputeServiceStub(s.channel()), pause=0.15)
        before = s.metric("splitserve_connections_total", port="grpc") or 0
        gen = split_llm.generate(stub, pb[0], clients["gpt2"], "gpt2s", PROMPT, TOKENS, log=quiet,
                                 restart=False)
        assert gen.tokens == want["gpt2"]
        assert s.metric("splitserve_connections_total", port="grpc") - before >= 2
    finally:
        s.proc.kill()
        s.proc.wait()


class Service:
    """Two pods behind a Service: the connection rotates and later steps reach
    the other pod (as after --max-connection-age, a scale-in or a rolling update)."""

    def __init__(self, first, second, switch_after: int):
        self.stubs, self.switch_after, self.calls = (first, second), switch_after, 0

    def Compute(self, request, timeout=None):  # noqa: N802
        self.calls += 1
        return self.stubs[self.calls > self.switch_after].Compute(request, timeout=timeout)


def test_a_step_on_another_pod_is_failed_precondition_never_a_wrong_token(setup, pb):
    repo, clients, want = setup
    pods = [serve(repo), serve(repo)]
    try:
        for p in pods:
            p.wait_ok(pb)
        stubs = [pb[1].ComputeServiceStub(p.channel()) for p in pods]
        # The unchanged loop: the documented status, no token from a foreign cache.
        with pytest.raises(grpc.RpcError) as e:
            split_llm.generate(Service(*stubs, switch_after=6), pb[0], clients["qwen2"], "qwen2s",
                               PROMPT, TOKENS, log=quiet, restart=False)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "restart decoding from the prompt" in e.value.details()
        # Restarting from the prompt (the example's default) on the new pod.
        gen = split_llm.generate(Service(*stubs, switch_after=6), pb[0], clients["qwen2"],
                                 "qwen2s", PROMPT, TOKENS, log=quiet)
        assert gen.tokens == want["qwen2"] and gen.restarts == 1
        # Without sessions the cache travels with each request: any pod continues it.
        gen = split_llm.generate(Service(*stubs, switch_after=6), pb[0], clients["qwen2"],
                                 "qwen2", PROMPT, TOKENS, log=quiet, restart=False)
        assert gen.tokens == want["qwen2"]
    finally:
        for p in pods:
            p.proc.kill()
            p.proc.wait()

"""Many KV sessions decoding at once (docs/llm.md, "Many sessions at once"): the
trunk's decode_batch runs the decode steps of sequences with different past
lengths in one forward, and the server batches the steps of concurrent
sessions into it. The oracle is transformers itself, row by row: every
session's hidden states (and, in process, its cache) equal the whole
transformers model decoding that sequence alone, and the example's greedy
tokens equal the unsplit model's generate(). Tiny configs keep it fast."""

import json
import re
import sys
import threading
import urllib.request

import pytest
import torch

from conftest import ROOT, Server
from test_llm_export import TOL, Oracle, export_cli, hf_model, kv_step

sys.path.insert(0, str(ROOT / "examples"))
import split_llm  # noqa: E402  (examples/split_llm.py)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SEED = 5
#: Weights ten times the default scale: attention sharp enough that a wrong
#: position, a padded one or another row's shows.
GPT2 = dict(model_type="gpt2", n_layer=3, n_embd=64, n_head=4, n_positions=320,
            vocab_size=256, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
             vocab_size=256, initializer_range=0.2)
LAYERS = (1, 3)
SESSIONS = 16
#: Prompt lengths spread over 1..200.
PROMPTS = [1 + (199 * i) // (SESSIONS - 1) for i in range(SESSIONS)]
STEPS = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm-batch")
    for name, spec in (("gpt2", GPT2), ("qwen2", QWEN2)):
        (tmp / f"{name}.json").write_text(json.dumps(spec))
        assert export_cli("--config", str(tmp / f"{name}.json"), "--seed", str(SEED), "--layers",
                          f"{LAYERS[0]}:{LAYERS[1]}", "--out", str(tmp / "repo")) == 0
    return tmp


@pytest.mark.parametrize("name,spec", [("gpt2", GPT2), ("qwen2", QWEN2)])
def test_decode_batch_equals_transformers_row_by_row(exported, name, spec):
    """In process: rows of past lengths 1..90 in one decode_batch, each cache
    with spare capacity holding garbage beyond its length; every row's hidden
    state and cache equal transformers decoding that sequence alone."""
    trunk = torch.jit.load(str(exported / "repo" / name / "1" / "model.pt"))
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 2, 17, 90, 5]
    oracles, caches = [], []
    for n in lengths:
        # One model per sequence: an Oracle's hooks act on every call of its model.
        oracle = Oracle(hf_model(spec, SEED), *LAYERS)
        oracles.append(oracle)
        _, present = oracle.step(torch.randn(1, n, 64, generator=gen))
        for t in present:
            c = torch.randn(1, t.shape[1], n + 7, t.shape[3], generator=gen) * 100
            c[:, :, :n] = t
            caches.append(c)
    try:
        for step in range(3):
            x = torch.randn(len(lengths), 1, 64, generator=gen)
            with torch.no_grad():
                got, new = trunk.decode_batch(x, caches, lengths)
            assert len(new) == 2 * (LAYERS[1] - LAYERS[0])
            per_row = len(new)
            for b, oracle in enumerate(oracles):
                want, want_past = oracle.step(x[b:b + 1])
                where = f"{name} row {b} (past {lengths[b]}) step {step}"
                torch.testing.assert_close(got[b:b + 1], want, **TOL, msg=lambda m: f"{where}: {m}")
                for i, w in enumerate(want_past):
                    g = caches[b * per_row + i][:, :, :lengths[b] + 1]
                    torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{where} cache {i}: {m}")
                    torch.testing.assert_close(new[i][b:b + 1], w[:, :, -1:], **TOL)
            lengths = [n + 1 for n in lengths]
    finally:
        for o in oracles:
            o.close()


def metric(server: Server, family: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf'{family}\{{(.*)\}} (\S+)$', line)
        if m and f'model="{model}"' in m.group(1):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def server(exported, pb):
    """One worker and decode batches of up to 16: concurrent sessions' steps
    queue while a batch runs, then run together. Prompts run in chunks of at
    most 32 positions."""
    s = Server("--model", f"g={exported / 'repo' / 'gpt2' / '1' / 'model.pt'}",
               "--kv-sessions", "g", "--max-batch-size", "g=16", "--workers", "1",
               "--kv-prefill-chunk", "32", "--device", "cpu")
    try:
        s.wait_ok(pb)
        yield s
    finally:
        s.proc.kill()
        s.proc.wait()


def run_concurrently(fns):
    errors, threads = [], []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    for fn in fns:
        threads.append(threading.Thread(target=wrap, args=(fn,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]


def alone(trunk, seq):
    """The trunk decoding one sequence by itself, in process: unbatched, the
    cache its own forward returns (test_llm_export holds it to transformers)."""
    outs, past = [], []
    with torch.no_grad():
        for x in seq:
            out, past = trunk(x, past)
            outs.append(out)
    return outs


def test_sixteen_sessions_decode_together_as_each_alone(exported, server, pb):
    """16 sessions, prompts of 1..200 positions, 64 decode steps each, at once
    (half of them starting while the others decode): every hidden state equals
    that session decoded alone (and, for the longest prompt's first 16 steps,
    transformers itself), batches of sessions with different past lengths did form, and the
    prompts ran in chunks between them (the metrics say so)."""
    pb2 = pb[0]
    stub = pb[1].ComputeServiceStub(server.channel())
    trunk = torch.jit.load(str(exported / "repo" / "gpt2" / "1" / "model.pt"))
    gen = torch.Generator().manual_seed(2)
    inputs = [[torch.randn(1, n, 64, generator=gen)] +
              [torch.randn(1, 1, 64, generator=gen) for _ in range(STEPS)] for n in PROMPTS]
    want = [alone(trunk, seq) for seq in inputs]
    oracle = Oracle(hf_model(GPT2, SEED), *LAYERS)
    try:
        for step, x in enumerate(inputs[-1][:17]):
            torch.testing.assert_close(want[-1][step], oracle.step(x)[0], **TOL)
    finally:
        oracle.close()
    got = [[] for _ in inputs]
    decoding = threading.Event()
    chunks = metric(server, "splitserve_kv_prefill_chunks_total", "g")

    def session(i):
        def run():
            if i % 2:
                assert decoding.wait(timeout=120)
            past = []
            for step, x in enumerate(inputs[i]):
                out, past = kv_step(stub, pb2, "g", x, past)
                got[i].append(out)
                if step == 4:
                    decoding.set()
            assert past[0].shape[2] == PROMPTS[i] + STEPS and past[0].numel() == 0
        return run

    run_concurrently([session(i) for i in range(SESSIONS)])
    for i in range(SESSIONS):
        for step, (g, w) in enumerate(zip(got[i], want[i], strict=True)):
            where = f"session {i} (prompt {PROMPTS[i]}) step {step}"
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{where}: {m}")
    decoded = metric(server, "splitserve_kv_decoded_tokens_total", "g")
    batches = metric(server, "splitserve_kv_decode_batch_size_count", "g")
    assert decoded >= SESSIONS * STEPS
    # Batches formed: far fewer forwards than steps, some of mixed past lengths.
    assert batches < decoded / 2, (batches, decoded)
    assert metric(server, "splitserve_kv_decode_mixed_batches_total", "g") > 0
    # Prompts of more than 32 positions ran in chunks.
    assert metric(server, "splitserve_kv_prefill_chunks_total", "g") - chunks >= sum(
        -(-n // 32) for n in PROMPTS if n > 32)


def test_the_example_decodes_the_same_tokens_with_sixteen_at_once(exported, server, pb):
    """examples/split_llm.py's greedy loop in 16 threads against the batching
    server (prompts of 1..200 tokens): each gets the tokens it gets alone, and
    those are the unsplit generate()'s."""
    client = split_llm.ClientModel(str(exported / "gpt2.json"), SEED, *LAYERS)
    stub = pb[1].ComputeServiceStub(server.channel())
    tokens = 8
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPTS]

    def generate(i):
        return split_llm.generate(stub, pb[0], client, "g", prompts[i], tokens,
                                  restart=False, log=lambda _: None).tokens

    by_itself = [generate(i) for i in range(SESSIONS)]
    for i in (0, SESSIONS - 1):
        assert by_itself[i] == split_llm.unsplit_generate(client, prompts[i], tokens)
    assert len({tuple(t) for t in by_itself}) > 1
    got = [None] * SESSIONS
    mixed = metric(server, "splitserve_kv_decode_mixed_batches_total", "g")

    def session(i):
        def run():
            got[i] = generate(i)
        return run

    run_concurrently([session(i) for i in range(SESSIONS)])
    assert got == by_itself
    assert metric(server, "splitserve_kv_decode_mixed_batches_total", "g") > mixed


#: A batch window far longer than any step here: a decode step that waited
#: for it shows in the queue-time histogram above 1 s.
WINDOW_US = 2_000_000


@pytest.fixture(scope="module")
def windowed(exported, pb):
    """Decode batches of up to 16 with a 2 s batch window: a decode batch waits
    for the sessions known to be decoding, never for the window itself."""
    s = Server("--model", f"g={exported / 'repo' / 'gpt2' / '1' / 'model.pt'}",
               "--kv-sessions", "g", "--max-batch-size", "g=16", "--workers", "1",
               "--batch-timeout-us", f"g={WINDOW_US}", "--device", "cpu")
    try:
        s.wait_ok(pb)
        yield s
    finally:
        s.proc.kill()
        s.proc.wait()


def waits(server: Server) -> tuple[float, float]:
    """(queue waits of model g, those of at most 1 s) so far."""
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=10).read().decode()
    total = short = 0.0
    for line in text.splitlines():
        if not line.startswith("splitserve_queue_duration_seconds_") or 'model="g"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("splitserve_queue_duration_seconds_count"):
            total += value
        elif 'le="1"' in line:
            short += value
    return total, short


def test_a_lone_session_does_not_wait_for_the_batch_window(windowed, pb):
    """One session decoding alone on a server with a 2 s window: no other
    session is decoding, so no step waits (with the plain window, every step
    would wait 2 s for rows that never come)."""
    stub = pb[1].ComputeServiceStub(windowed.channel())
    gen = torch.Generator().manual_seed(4)
    before = waits(windowed)
    past = []
    for x in [torch.randn(1, 3, 64, generator=gen)] + [torch.randn(1, 1, 64, generator=gen)
                                                      for _ in range(8)]:
        _, past = kv_step(stub, pb[0], "g", x, past)
    total, short = (a - b for a, b in zip(waits(windowed), before))
    assert total == 9, total
    assert short == total, f"{total - short} of {total} steps waited over 1 s"


def test_sessions_at_different_paces_merge_and_one_that_stops_is_not_awaited(windowed, pb):
    """Four sessions whose clients take 0, 4, 8 and 12 ms between an answer
    and their next step (longer than a forward here): once the server has seen
    each decode twice, their steps run together, since the batch waits for
    sessions it saw decoding. Then one stops without closing its session: the
    other three go on with no step waiting for it (nor for the 2 s window)."""
    import time

    stub = pb[1].ComputeServiceStub(windowed.channel())
    warm_steps, steps, stopper_steps = 3, 16, 4
    seen = {}

    def snapshot():
        seen["decoded"] = metric(windowed, "splitserve_kv_decoded_tokens_total", "g")
        seen["batches"] = metric(windowed, "splitserve_kv_decode_batch_size_count", "g")
        seen["waits"] = waits(windowed)

    # The counts start once every session has decoded a few steps.
    barrier = threading.Barrier(4, action=snapshot)

    def session(i):
        def run():
            gen = torch.Generator().manual_seed(10 + i)
            _, past = kv_step(stub, pb[0], "g", torch.randn(1, 2 + i, 64, generator=gen), [])
            for step in range(warm_steps + (stopper_steps if i == 3 else steps)):
                if step == warm_steps:
                    barrier.wait(timeout=60)
                time.sleep(0.004 * i)
                _, past = kv_step(stub, pb[0], "g", torch.randn(1, 1, 64, generator=gen), past)
        return run

    run_concurrently([session(i) for i in range(4)])
    rows = metric(windowed, "splitserve_kv_decoded_tokens_total", "g") - seen["decoded"]
    forwards = metric(windowed, "splitserve_kv_decode_batch_size_count", "g") - seen["batches"]
    assert rows == 3 * steps + stopper_steps
    # Unmerged, they would run about one row a forward (each client arrives
    # after the others' forward ended); merged, 4 and then 3 (the first
    # round after the barrier and a late client now and then split).
    assert rows / forwards >= 2.0, (rows, forwards)
    total, short = (a - b for a, b in zip(waits(windowed), seen["waits"]))
    assert total == rows
    assert short == total, f"{total - short} of {total} steps waited over 1 s"

"""Many KV sessions decoding at once: 1, 4 and 16 concurrent sessions of a GPT-2
trunk on one splitserve, whose decode steps batch into one forward
(docs/llm.md, "Many sessions at once"), and a 1,000-position prompt arriving
in the middle of the 16-session run.

The trunk is the one `scripts/bench/llm.py` exports (layers 2..9 of GPT-2
small, width 768, random weights, float32). The server:

  splitserve serve --model gpt2=... --kv-sessions gpt2 --max-batch-size gpt2=16 --workers 1 \
      --batch-timeout-us gpt2=2000

Each session is splitlearn_comm's client loop (float32 TensorCodec,
use_cache=true, the reply's present_key_values passed back: the session's
handle), one thread per session in this process: a prompt of 16 positions,
then one position per step until the context reaches 256. Per run it reports
the decode tokens/s of all sessions together (decode steps over the wall time
from the first decode step to the last), ms/token p50/p99 over every decode
step (the client's whole call), the server's mean decode batch size (its
metrics), and checks the targets on the 2-core machine:

  - 16 sessions: at least 4x the tokens/s of one session;
  - 16 sessions: p99 ms/token at most 3x one session's;
  - a 1,000-position prompt sent to a new session when the 16 sessions are
    half-way: no session's p99 more than 2x its p99 in the run without it.

Session 0 of every run decodes the same inputs: its hidden states must agree
across runs (batched vs alone) within 1e-3. Writes docs/benchmarks-llm-concurrent.json
and .md (--quick: small, into the temp directory; the targets are not checked).

Usage (from the repository root; `make bench-llm` runs it after llm.py):
  .venv/bin/python scripts/bench/llm_concurrent.py
  .venv/bin/python scripts/bench/llm_concurrent.py --quick
"""

import argparse
import atexit
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llm  # noqa: E402  (the trunk's export, the client loop)
import run as common  # noqa: E402

ROOT = common.ROOT
BIN = common.BIN
MODEL = "gpt2"
SESSIONS = (1, 4, 16)
PREFILL = 16
CONTEXT = 256
LONG_PROMPT = 1000
MAX_BATCH = 16
#: How long a partial decode batch waits for the other sessions' next steps
#: (Triton's max_queue_delay): their clients need a moment to send them.
BATCH_TIMEOUT_US = 2000
QUICK = dict(sessions=(1, 4, 16), prefill=8, context=40, long_prompt=200)
DEFAULT_OUT = "docs/benchmarks-llm-concurrent.json"
DEFAULT_MARKDOWN = "docs/benchmarks-llm-concurrent.md"
TARGET_SPEEDUP, TARGET_P99, TARGET_PREFILL_P99 = 4.0, 3.0, 2.0
ANSWER_TOLERANCE = 1e-3


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_server(model: Path, logdir: Path):
    port, metrics_port = common.free_port(), common.free_port()
    addr = f"127.0.0.1:{port}"
    argv = [str(BIN), "serve", "--grpc-addr", addr, "--metrics-addr", f"127.0.0.1:{metrics_port}",
            "--http-addr", "127.0.0.1:0", "--device", "cpu", "--model", f"{MODEL}={model}",
            "--kv-sessions", MODEL, "--max-batch-size", f"{MODEL}={MAX_BATCH}", "--workers", "1",
            "--batch-timeout-us", f"{MODEL}={BATCH_TIMEOUT_US}",
            "--warmup-shape", f"{MODEL}=1x16x{llm.WIDTH}"]  # fmt: skip
    with open(logdir / "server.out", "wb") as out, open(logdir / "server.err", "wb") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                process_group=0, preexec_fn=common._die_with_parent)  # fmt: skip
    common._LIVE.add(proc)
    deadline = time.monotonic() + llm.READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise llm.BenchError(f"splitserve exited {proc.returncode}: {common.tail(logdir / 'server.err')}")
        probe = [str(BIN), "probe", "--addr", addr, "--timeout", "1s"]
        if subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0:
            return proc, addr, f"http://127.0.0.1:{metrics_port}/metrics"
        time.sleep(0.2)
    common.stop_process(proc)
    raise llm.BenchError("splitserve not ready: " + common.tail(logdir / "server.err"))


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for name in ("splitserve_kv_decode_batch_size_sum", "splitserve_kv_decode_batch_size_count",
                 "splitserve_kv_decode_mixed_batches_total", "splitserve_kv_prefill_chunks_total"):
        m = re.search(rf'^{name}\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def percentile(values: list, p: float):
    return llm.percentile(values, p)


def run_sessions(addr: str, n: int, prefill: int, context: int, long_prompt=None) -> dict:
    """n sessions decoding at once; with long_prompt, one more client sends a
    prompt of that many positions to a new session when session 0 is half-way."""
    import torch

    clients = [llm.Client(addr, MODEL) for _ in range(n)]
    steps = [[] for _ in range(n)]  # (start, seconds) per decode step
    first_outputs = []
    half = threading.Event()
    errors = []
    barrier = threading.Barrier(n)
    long_done = {}

    def session(i):
        try:
            gen = torch.Generator().manual_seed(1000 + i)
            x = torch.randn(1, prefill, llm.WIDTH, generator=gen)
            barrier.wait(timeout=60)
            out, past, _, _, _ = clients[i].step(x, None)
            if i == 0:
                first_outputs.append(out)
            for c in range(prefill, context):
                x = torch.randn(1, 1, llm.WIDTH, generator=gen)
                started = time.monotonic()
                out, past, seconds, _, _ = clients[i].step(x, past)
                steps[i].append((started, seconds))
                if i == 0:
                    first_outputs.append(out)
                    if c == (prefill + context) // 2:
                        half.set()
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            half.set()

    def long_client():
        try:
            half.wait()
            client = llm.Client(addr, MODEL)
            x = torch.randn(1, long_prompt, llm.WIDTH, generator=torch.Generator().manual_seed(7))
            started = time.monotonic()
            _, past, seconds, _, _ = client.step(x, None)
            long_done.update(started=started, seconds=seconds)
            client.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    if long_prompt:
        threads.append(threading.Thread(target=long_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    if errors:
        raise llm.BenchError(f"{n} sessions: {common.scrub(str(errors[0]))[:300]}")
    begin = min(s[0][0] for s in steps)
    end = max(s[-1][0] + s[-1][1] for s in steps)
    tokens = sum(len(s) for s in steps)
    all_ms = [sec * 1000 for s in steps for _, sec in s]
    return {
        "sessions": n,
        "decode_tokens": tokens,
        "tokens_per_s": tokens / (end - begin),
        "ms_p50": percentile(all_ms, 50),
        "ms_p99": percentile(all_ms, 99),
        "session_p99": [percentile([sec * 1000 for _, sec in s], 99) for s in steps],
        "long_prompt": long_prompt,
        "long_prompt_ms": long_done.get("seconds", 0) * 1000 if long_prompt else None,
        "outputs0": first_outputs,
    }


def run_all(args) -> dict:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    model = llm.export_trunk(cache)
    results = {"quick": args.quick, "prefill": args.prefill, "context": args.context,
               "machine": common.machine_facts(), "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-llm-concurrent-") as logdir:
        proc, addr, metrics = start_server(model, Path(logdir))
        try:
            # Untimed: compiles decode_batch for a few batch sizes.
            run_sessions(addr, 4, args.prefill, args.prefill + 4)
            runs = [(n, None) for n in args.sessions] + [(max(args.sessions), args.long_prompt)]
            for n, long_prompt in runs:
                before = scrape(metrics)
                progress(f"{n} sessions" + (f" + a {long_prompt}-position prompt" if long_prompt else ""))
                r = run_sessions(addr, n, args.prefill, args.context, long_prompt)
                after = scrape(metrics)
                d = {k: after[k] - before[k] for k in after}
                batches = d["splitserve_kv_decode_batch_size_count"]
                r["mean_batch"] = d["splitserve_kv_decode_batch_size_sum"] / batches if batches else None
                r["mixed_batches"] = d["splitserve_kv_decode_mixed_batches_total"]
                r["prefill_chunks"] = d["splitserve_kv_prefill_chunks_total"]
                progress(f"  {r['tokens_per_s']:.1f} tokens/s, ms/token p50 {r['ms_p50']:.1f} "
                         f"p99 {r['ms_p99']:.1f}, mean batch {r['mean_batch'] or 0:.1f}")  # fmt: skip
                results["runs"].append(r)
        finally:
            common.stop_process(proc)
    ref = results["runs"][0]["outputs0"]
    diff = 0.0
    for r in results["runs"][1:]:
        for a, b in zip(ref, r.pop("outputs0")):
            diff = max(diff, float((a - b).abs().max()))
    results["runs"][0].pop("outputs0")
    results["answer_max_diff"] = diff
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> list:
    runs = [r for r in results["runs"] if not r["long_prompt"]]
    one, many = runs[0], runs[-1]
    (long,) = [r for r in results["runs"] if r["long_prompt"]]
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    p99 = many["ms_p99"] / one["ms_p99"]
    prefill = max(a / b for a, b in zip(long["session_p99"], many["session_p99"]))
    n = many["sessions"]
    return [
        {"target": f"{n} sessions: tokens/s >= {TARGET_SPEEDUP:g}x one session's",
         "measured": f"{speedup:.2f}x", "met": speedup >= TARGET_SPEEDUP},
        {"target": f"{n} sessions: p99 ms/token <= {TARGET_P99:g}x one session's",
         "measured": f"{p99:.2f}x", "met": p99 <= TARGET_P99},
        {"target": f"a {long['long_prompt']}-position prompt mid-run: every session's p99 <= "
                   f"{TARGET_PREFILL_P99:g}x its p99 without it",
         "measured": f"{prefill:.2f}x at most", "met": prefill <= TARGET_PREFILL_P99},
        {"target": f"session 0's hidden states equal in every run (within {ANSWER_TOLERANCE:g})",
         "measured": f"{results['answer_max_diff']:.2e}",
         "met": results["answer_max_diff"] <= ANSWER_TOLERANCE},
    ]  # fmt: skip


def render_markdown(results: dict) -> str:
    lines = [
        "# Many KV sessions decoding at once: a split GPT-2 trunk on splitserve",
        "",
        f"Generated by `scripts/bench/llm_concurrent.py`{' --quick' if results['quick'] else ''} "
        f"(`make bench-llm`). Each session: a prompt of {results['prefill']} positions, then "
        f"one position per step to context {results['context']}; one client thread per session; "
        f"the server `--max-batch-size {MODEL}={MAX_BATCH} --batch-timeout-us {MODEL}={BATCH_TIMEOUT_US} "
        f"--workers 1`. Machine: "
        f"{results['machine'].get('cpu_model') or 'unknown'}.",
        "",
        "| sessions | decode tokens/s | ms/token p50 | ms/token p99 | mean decode batch | "
        "batches of mixed lengths | prompt chunks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        name = f"{r['sessions']}" + (f" + {r['long_prompt']}-position prompt ({r['long_prompt_ms']:.0f} ms)"
                                     if r["long_prompt"] else "")  # fmt: skip
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['ms_p50']:.1f} | {r['ms_p99']:.1f} | "
                     f"{r['mean_batch'] or 0:.1f} | {r['mixed_batches']:.0f} | {r['prefill_chunks']:.0f} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    lines += [
        "",
        "How the batches form (docs/llm.md, \"Many sessions at once\"): a worker that takes a",
        "decode step waits for the sessions it knows are decoding (answered, and due back within",
        "twice their client's usual turn-around), at most the batch window or one decode batch's",
        "time, and for nobody else. A lone session never waits; sessions whose clients answer at",
        "slightly different times merge into one batch instead of alternating in groups.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small contexts, into the temp directory")
    p.add_argument("--cache-dir", default=llm.DEFAULT_CACHE)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    q = QUICK if args.quick else dict(sessions=SESSIONS, prefill=PREFILL, context=CONTEXT,
                                      long_prompt=LONG_PROMPT)  # fmt: skip
    for k, v in q.items():
        setattr(args, k, v)
    scratch = Path(tempfile.gettempdir())
    args.out = args.out or (str(scratch / "splitserve-bench-llm-concurrent-quick.json")
                            if args.quick else DEFAULT_OUT)  # fmt: skip
    args.markdown = args.markdown or (str(scratch / "splitserve-bench-llm-concurrent-quick.md")
                                      if args.quick else DEFAULT_MARKDOWN)  # fmt: skip
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    atexit.register(common._kill_leftovers)
    signal.signal(signal.SIGTERM, common._exit_on_sigterm)
    try:
        results = run_all(args)
    except llm.BenchError as e:
        sys.exit(f"bench-llm (concurrent): {common.scrub(str(e))}")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.markdown).write_text(render_markdown(results))
    progress(f"wrote {common.display_path(Path(args.out))} and {common.display_path(Path(args.markdown))}")
    for t in results["targets"]:
        progress(f"  {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['measured']}")
    if results["answer_max_diff"] > ANSWER_TOLERANCE:
        return 1
    if not args.quick and not all(t["met"] for t in results["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

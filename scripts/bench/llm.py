"""Split-LLM decoding benchmark: a GPT-2 trunk on splitserve, with and without KV
sessions, against the Python server splitlearn_comm users run, same run.

The trunk is layers 2..9 of GPT-2 small (8 blocks, width 768) with random
weights, float32, written once by splitserve-export into a cache directory.
Three servers decode it:

  splitserve sessions  `splitserve serve` with the trunk under a second name
                       given to --kv-sessions: the cache stays on the server
                       and the client holds a small handle;
  splitserve           the same process and file, the cache on the wire;
  Python               scripts/bench/llm_server.py: transformers' GPT2Block
                       with a DynamicCache behind
                       grpc.server(ThreadPoolExecutor(10)), every entry of the
                       cache decoded and encoded per step as splitlearn_comm's
                       KVCacheCodec does (raw float32 bytes).

Each is driven by splitlearn_comm's client loop, unchanged: the float32
TensorCodec, use_cache=true, and the present_key_values of each reply passed
back as the next request's past_key_values without looking inside. A sequence
is a prefill of 16 positions, then one position per step until the past holds
1,000. A step's context is the past it is sent with. Per context (16: the
first decode steps; 128, 512, 1,000: the steps ending there) it reports
ms/token p50/p99 (the client's whole call: encode, RPC, decode), bytes per
step (request + response, serialized protobuf), and the server's CPU seconds
per token (/proc/PID/stat utime+stime), each as a ratio to the Python server
measured in the same run, and checks the targets:

  - with sessions, bytes per decode step at context 1,000 within 2x those at 16;
  - with sessions, ms/token (p50) at 512 at most 1/5 of the Python server's;
  - without sessions, never slower (p50 at every context) than the Python server.

Every server gets the same inputs; their answers are compared step by step.
Writes the raw results as JSON (docs/benchmarks-llm.json) and the report as
docs/benchmarks-llm.md. Exits 1 when an answer differs, or (full runs only)
when a target is missed.

Usage (from the repository root; `make bench-llm` runs the first line):
  .venv/bin/python scripts/bench/llm.py
  .venv/bin/python scripts/bench/llm.py --quick      # small contexts, writes to the temp dir
  .venv/bin/python scripts/bench/llm.py --repeats 1 --contexts 128,512
  .venv/bin/python scripts/bench/llm.py --from-json docs/benchmarks-llm.json   # re-render only
"""

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as common  # noqa: E402  (scripts/bench/run.py: processes, facts, formatting)
import v2  # noqa: E402  (CPU accounting of processes and of the machine)

ROOT = common.ROOT
BIN = common.BIN
EXPORTER = ROOT / "scripts" / "export"

# The workload.
SOURCE_CONFIG = "gpt2-small-random"
SEED = 0
LAYERS = "2:10"
WIDTH = 768
TRUNK_LAYERS, TRUNK_KV_HEADS, TRUNK_HEAD_DIM = 8, 12, 64
PREFILL = 16
CONTEXTS = (128, 512, 1000)
WINDOW = 32  # decode steps per context and sequence
REPEATS = 2  # sequences per server
WARMUP_STEPS = 16  # untimed decode steps per server before the first sequence
QUICK_CONTEXTS = (32, 48, 64)
QUICK_WINDOW = 8
QUICK_REPEATS = 1
QUICK_WARMUP_STEPS = 4

# Targets (issue: "How it will be judged").
TARGET_BYTES_GROWTH = 2.0  # sessions: bytes at the largest context <= 2x those at the prefill's
TARGET_SPEEDUP = 5.0  # sessions: p50 at SPEED_CONTEXT <= the Python server's / 5
SPEED_CONTEXT = 512
ANSWER_TOLERANCE = 1e-3  # most |difference| between two servers' hidden states

MODEL = "gpt2"  # served without sessions
MODEL_SESSIONS = "gpt2-sessions"  # the same file, --kv-sessions
RPC_TIMEOUT_S = 30.0  # splitlearn_comm's client default
MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # splitlearn_comm's client default, both ways
READY_TIMEOUT_S = 180.0
QUIET_WAIT_S = 120.0
OTHER_LOAD_NOTE = 0.2  # cores used beside server and client during a sequence: noted
DEFAULT_CACHE = "target/bench-llm"
DEFAULT_OUT = "docs/benchmarks-llm.json"
DEFAULT_MARKDOWN = "docs/benchmarks-llm.md"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Config:
    name: str
    process: str  # "splitserve" or "python"
    model_id: str
    label: str
    description: str


CONFIGS = {
    c.name: c
    for c in (
        Config("sessions", "splitserve", MODEL_SESSIONS, "splitserve sessions",
               f"`splitserve serve --model {MODEL_SESSIONS}=... --kv-sessions {MODEL_SESSIONS}`: "
               "the cache stays on the server, the client passes back a handle"),
        Config("splitserve", "splitserve", MODEL, "splitserve",
               f"the same process and file as `{MODEL}`, no sessions: the whole cache both ways"),
        Config("python", "python", MODEL, "Python",
               "`scripts/bench/llm_server.py`: transformers' GPT2Block with a DynamicCache, "
               "grpc.server(ThreadPoolExecutor(max_workers=10)), KVCacheCodec per step"),
    )
}  # fmt: skip


class BenchError(Exception):
    """A server or a sequence that failed."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- The trunk --------------------------------------------------------------------


def exporter_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((EXPORTER / "splitserve_export").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for name in ("torch", "transformers"):
        h.update(f"{name}={common.package_version(name)}".encode())
    h.update(f"{SOURCE_CONFIG} {SEED} {LAYERS} float32".encode())
    return h.hexdigest()[:16]


def export_trunk(cache_dir: Path) -> Path:
    """The trunk's model.pt, exported unless this exporter already wrote it."""
    out = cache_dir / "models"
    model = out / MODEL / "1" / "model.pt"
    stamp = cache_dir / "export.stamp"
    digest = exporter_digest()
    if model.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        progress(f"trunk: {common.display_path(model)} (cached)")
        return model
    progress(f"trunk: exporting {SOURCE_CONFIG} layers {LAYERS} into {common.display_path(out)}")
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(EXPORTER)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    argv = [sys.executable, "-m", "splitserve_export", "--config", SOURCE_CONFIG, "--seed", str(SEED),
            "--layers", LAYERS, "--out", str(out), "--name", MODEL, "--dtype", "float32"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"splitserve-export exited {done.returncode}: "
                         f"{common.last_lines(done.stderr or done.stdout, 2)}")  # fmt: skip
    stamp.write_text(digest + "\n")
    progress(f"trunk: exported in {time.monotonic() - started:.0f} s")
    return model


# --- Servers ----------------------------------------------------------------------


def server_argv(process: str, model: Path, port: int) -> list:
    if process == "python":
        return [sys.executable, str(HERE / "llm_server.py"), "--port", str(port), "--model", str(model)]
    return [
        str(BIN), "serve",
        "--grpc-addr", f"127.0.0.1:{port}",
        "--metrics-addr", "127.0.0.1:0",
        "--http-addr", "127.0.0.1:0",
        "--device", "cpu",
        "--model", f"{MODEL}={model}",
        "--model", f"{MODEL_SESSIONS}={model}",
        "--kv-sessions", MODEL_SESSIONS,
    ]  # fmt: skip


def is_ready(process: str, addr: str, stdout_path: Path) -> bool:
    if process == "python":
        return "ready" in stdout_path.read_text(errors="replace").split()
    probe = [str(BIN), "probe", "--addr", addr, "--timeout", "1s"]
    return subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0


def start_server(process: str, model: Path, logdir: Path):
    """Starts one server process on a free loopback port; (proc, addr) once it answers."""
    port = common.free_port()
    addr = f"127.0.0.1:{port}"
    out_path, err_path = logdir / f"{process}.out", logdir / f"{process}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(server_argv(process, model, port), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, process_group=0,
                                preexec_fn=common._die_with_parent)  # fmt: skip
    common._LIVE.add(proc)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{process} exited {proc.returncode} at start: {common.tail(err_path)}")
        if is_ready(process, addr, out_path):
            return proc, addr
        time.sleep(0.2)
    common.stop_process(proc)
    raise BenchError(f"{process} not ready after {READY_TIMEOUT_S:.0f} s: {common.tail(err_path)}")


def server_cpu(pid: int) -> float:
    stat = v2.proc_stat(pid)
    if stat is None:
        raise BenchError(f"server process {pid} is gone")
    return stat[1]


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --- The client loop ----------------------------------------------------------------


class Client:
    """splitlearn_comm's GRPCComputeClient.compute_with_cache, one step at a time."""

    def __init__(self, addr: str, model_id: str):
        import grpc
        import llm_server  # the TensorCodec / KVCacheCodec both sides use, and the stubs

        self.codec = llm_server
        self.pb2 = llm_server.pb2
        self.model_id = model_id
        self.channel = grpc.insecure_channel(addr, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
        ])  # fmt: skip
        self.stub = llm_server.pb2_grpc.ComputeServiceStub(self.channel)
        self.stub.HealthCheck(self.pb2.HealthRequest(), timeout=RPC_TIMEOUT_S)
        self.request_count = 0

    def step(self, x, past):
        """(output, present, seconds, request bytes, response bytes) of one call."""
        started = time.perf_counter()
        self.request_count += 1
        data, shape = self.codec.base.encode(x)
        entries = self.codec.encode_cache(past) if past is not None else []
        request = self.pb2.ComputeRequest(data=data, shape=list(shape), request_id=self.request_count,
                                          use_cache=True, model_id=self.model_id)  # fmt: skip
        if entries:
            request.past_key_values.extend(entries)
        response = self.stub.Compute(request, timeout=RPC_TIMEOUT_S)
        out = self.codec.base.decode(response.data, tuple(response.shape))
        present = self.codec.decode_cache(response.present_key_values)
        seconds = time.perf_counter() - started
        return out, present, seconds, request.ByteSize(), response.ByteSize()

    def close(self):
        self.channel.close()


def inputs(seed: int, last_context: int, prefill: int):
    """The hidden states a client's embeddings would produce: the prompt, then one per step."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    yield torch.randn(1, prefill, WIDTH, generator=gen)
    for _ in range(prefill, last_context + 1):
        yield torch.randn(1, 1, WIDTH, generator=gen)


def decode_sequence(client: Client, pid: int, seed: int, prefill: int, last_context: int, keep=None):
    """One sequence through the unchanged client loop. Per decode step: the context
    (past length sent), the call's ms, request and response bytes, the server's
    CPU seconds after it (only the steps whose context is in `keep`, when given);
    and the hidden states returned."""
    import torch

    machine0, own0, cpu0, wall0 = v2.machine_busy(), own_cpu(), server_cpu(pid), time.monotonic()
    steps = {"context": [], "ms": [], "request_bytes": [], "response_bytes": [], "server_cpu_s": []}
    outputs, past, prefill_ms = [], None, None
    cpu_before_decode = None
    for i, x in enumerate(inputs(seed, last_context, prefill)):
        context = 0 if past is None else past[0][0].shape[2]
        if i == 0:
            out, past, seconds, _, _ = client.step(x, None)
            prefill_ms = seconds * 1000
            cpu_before_decode = server_cpu(pid)
        else:
            if context != prefill + i - 1:
                raise BenchError(f"the reply's cache says past {context}, the client sent {prefill + i - 1} positions")
            out, past, seconds, req, resp = client.step(x, past)
            if keep is None or context in keep:
                for key, value in (("context", context), ("ms", round(seconds * 1000, 3)),
                                   ("request_bytes", req), ("response_bytes", resp),
                                   ("server_cpu_s", server_cpu(pid))):  # fmt: skip
                    steps[key].append(value)
        outputs.append(out.reshape(-1, WIDTH)[-1])
        if past is None:
            raise BenchError("a use_cache=true reply carried no present_key_values")
    wall = time.monotonic() - wall0
    server = server_cpu(pid) - cpu0
    own = own_cpu() - own0
    other = max(0.0, v2.machine_busy() - machine0 - server - own)
    elements = sum(k.numel() + v.numel() for k, v in past)
    return {
        "seed": seed,
        "prefill_ms": round(prefill_ms, 3),
        "server_cpu_before_decode_s": cpu_before_decode,
        "steps": steps,
        "wall_s": round(wall, 3),
        "server_cpu_s": round(server, 3),
        "client_cpu_s": round(own, 3),
        "other_cores": round(other / wall, 3) if wall > 0 else None,
        "last_reply": {"cache_entries": len(past), "cache_elements": elements,
                       "key_shape": list(past[0][0].shape)},
    }, torch.stack(outputs)


# --- The run --------------------------------------------------------------------------


def machine_facts() -> dict:
    facts = common.machine_facts()
    # `splitserve --version` prints several lines (libtorch, CUDA, commit).
    facts["splitserve"] = "; ".join(line.strip() for line in (facts["splitserve"] or "").splitlines()) or None
    facts["transformers"] = common.package_version("transformers")
    return facts


def run_all(args) -> dict:
    if not BIN.is_file():
        sys.exit(f"{common.display_path(BIN)} is missing: run `make build`")
    results = {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "quick": args.quick,
        "command": args.command,
        "raw_results": common.display_path(args.out),
        "machine": machine_facts(),
        "settings": {
            "trunk": f"splitserve-export --config {SOURCE_CONFIG} --seed {SEED} --layers {LAYERS} "
                     "--dtype float32",
            "prefill": args.prefill,
            "contexts": args.contexts,
            "window": args.window,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "configs": list(CONFIGS),
        },
        "answers": {},
        "sequences": {name: [] for name in CONFIGS},
    }
    out = Path(args.out)
    started = time.monotonic()
    model = export_trunk(Path(args.cache_dir))
    last = max(args.contexts)
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-llm-") as logdir:
        procs, clients = {}, {}
        try:
            for process in ("splitserve", "python"):
                t0 = time.monotonic()
                procs[process] = start_server(process, model, Path(logdir))
                progress(f"{process}: ready in {time.monotonic() - t0:.0f} s")
            clients = {name: Client(procs[c.process][1], c.model_id) for name, c in CONFIGS.items()}
            preflight(clients, last)
            for name, c in CONFIGS.items():
                with rpc_errors(f"{name}, warm-up"):
                    decode_sequence(clients[name], procs[c.process][0].pid, 10_000, args.prefill,
                                    args.prefill + args.warmup_steps)
            keep = kept_contexts([args.prefill] + list(args.contexts), args.prefill, args.window)
            for r in range(args.repeats):
                names = list(CONFIGS)
                names = names[r % len(names):] + names[: r % len(names)]
                answers = {}
                for name in names:
                    quiet = None if args.quick else v2.wait_for_quiet(args.quiet_wait)
                    if quiet and not quiet["quiet"]:
                        progress(f"  the machine is not idle ({quiet['busy_cores']:.2f} cores busy); "
                                 "measuring anyway")  # fmt: skip
                    pid = procs[CONFIGS[name].process][0].pid
                    with rpc_errors(f"{name}, sequence {r + 1}"):
                        seq, answers[name] = decode_sequence(clients[name], pid, r, args.prefill, last, keep)
                    seq["before"] = quiet
                    results["sequences"][name].append(seq)
                    write_json(out, results)
                    progress(f"[{r + 1}/{args.repeats}] {name}: {seq['wall_s']:.1f} s, "
                             f"last step {seq['steps']['ms'][-1]:.1f} ms, other load "
                             f"{seq['other_cores']:.2f} cores; {time.monotonic() - started:.0f} s "
                             "so far")  # fmt: skip
                results["answers"][str(r)] = compare_answers(answers)
        finally:
            for c in clients.values():
                c.close()
            for proc, _ in procs.values():
                common.stop_process(proc)
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["summary"] = summarize(results)
    results["targets"] = check_targets(results)
    results["complete"] = True
    write_json(out, results)
    return results


@contextlib.contextmanager
def rpc_errors(what: str):
    import grpc

    try:
        yield
    except grpc.RpcError as e:
        raise BenchError(f"{what}: {e.code().name}: {(e.details() or '')[:300]}") from None


def preflight(clients: dict, context: int) -> None:
    """One decode step at the largest context with a made-up cache, on each server: a
    limit that refuses the largest messages shows now rather than after the run. (A
    model with sessions serves a client's own cache as before.)"""
    import torch

    zeros = torch.zeros(1, TRUNK_KV_HEADS, context, TRUNK_HEAD_DIM)
    past = tuple((zeros, zeros) for _ in range(TRUNK_LAYERS))
    for name, client in clients.items():
        with rpc_errors(f"{name}, one step at context {context}"):
            _, present, _, _, _ = client.step(torch.zeros(1, 1, WIDTH), past)
        if present is None or present[0][0].shape[2] != context + 1:
            raise BenchError(f"{name}: a step at context {context} did not return a cache of {context + 1}")


def write_json(path: Path, results: dict) -> None:
    """Indented, with each list of numbers on one line."""
    text = json.dumps(results, indent=1)
    text = re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def compare_answers(answers: dict) -> dict:
    """Most |difference| of each server's hidden states from the Python server's."""
    ref = answers["python"]
    return {name: float((a - ref).abs().max()) for name, a in answers.items() if name != "python"}


# --- Summary and targets -----------------------------------------------------------------


def percentile(values: list, p: float):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def window_range(row: int, prefill: int, window: int):
    """The contexts of the decode steps that stand for row `row`: the first `window`
    for the prefill's row, else the `window` ending at it."""
    return (prefill, prefill + window - 1) if row == prefill else (row - window + 1, row)


def kept_contexts(rows: list, prefill: int, window: int) -> set:
    """The steps a sequence records: every row's window and the step before it (whose
    server CPU reading starts the window's)."""
    keep = set()
    for row in rows:
        lo, hi = window_range(row, prefill, window)
        keep.update(range(lo - 1, hi + 1))
    return keep


def summarize(results: dict) -> dict:
    s = results["settings"]
    rows = [s["prefill"]] + list(s["contexts"])
    summary = {}
    for name in CONFIGS:
        seqs = results["sequences"][name]
        per = summary[name] = {"prefill_ms": percentile([q["prefill_ms"] for q in seqs], 50), "rows": {}}
        for row in rows:
            ms, cpu, tokens, exact = [], 0.0, 0, []
            for q in seqs:
                st = q["steps"]
                lo, hi = window_range(row, s["prefill"], s["window"])
                idx = [i for i, c in enumerate(st["context"]) if lo <= c <= hi]
                if not idx:
                    continue
                ms += [st["ms"][i] for i in idx]
                prev = [i for i, c in enumerate(st["context"]) if c == lo - 1]
                before = st["server_cpu_s"][prev[0]] if prev else q["server_cpu_before_decode_s"]
                cpu += st["server_cpu_s"][idx[-1]] - before
                tokens += len(idx)
                if row in st["context"]:
                    i = st["context"].index(row)
                    exact.append(st["request_bytes"][i] + st["response_bytes"][i])
            per["rows"][str(row)] = {
                "samples": len(ms),
                "ms_p50": percentile(ms, 50),
                "ms_p99": percentile(ms, 99),
                "bytes_per_step": percentile(exact, 50),
                "server_cpu_s_per_token": cpu / tokens if tokens else None,
            }
    for name in CONFIGS:
        for row, r in summary[name]["rows"].items():
            py = summary["python"]["rows"][row]
            r["vs_python"] = {k: common.ratio(r[k], py[k]) for k in
                              ("ms_p50", "ms_p99", "bytes_per_step", "server_cpu_s_per_token")}  # fmt: skip
    return summary


def check_targets(results: dict) -> list:
    s, summary = results["settings"], results["summary"]
    first, last = s["prefill"], max(s["contexts"])
    contexts = sorted(s["contexts"])
    speed_at = SPEED_CONTEXT if SPEED_CONTEXT in contexts else contexts[len(contexts) // 2]
    rows = lambda name: summary[name]["rows"]  # noqa: E731
    b0, b1 = rows("sessions")[str(first)]["bytes_per_step"], rows("sessions")[str(last)]["bytes_per_step"]
    fast, slow = rows("sessions")[str(speed_at)]["ms_p50"], rows("python")[str(speed_at)]["ms_p50"]
    slower = [
        (c, rows("splitserve")[str(c)]["ms_p50"], rows("python")[str(c)]["ms_p50"])
        for c in [first] + contexts
    ]
    missing = [c for c, a, b in slower if a is None or b is None]
    worst = max((a / b for _, a, b in slower if a and b), default=None)
    return [
        {
            "target": f"sessions: bytes per decode step at context {last:,} within "
                      f"{TARGET_BYTES_GROWTH:g}x those at {first}",
            "measured": f"{common.fmt(b1, 0)} vs {common.fmt(b0, 0)} bytes "
                        f"({common.fmt(common.ratio(b1, b0), 2, 'x')})",
            "met": None if b0 is None or b1 is None else b1 <= TARGET_BYTES_GROWTH * b0,
        },
        {
            "target": f"sessions: ms/token at context {speed_at:,} at most 1/{TARGET_SPEEDUP:g} "
                      "of the Python server's (p50)",
            "measured": f"{common.fmt(fast, 2)} vs {common.fmt(slow, 2)} ms "
                        f"(1/{common.fmt(common.ratio(slow, fast), 1)})",
            "met": None if fast is None or slow is None else fast * TARGET_SPEEDUP <= slow,
        },
        {
            "target": "without sessions: never slower than the Python server (p50 at every context)",
            "measured": f"slowest ratio {common.fmt(worst, 2, 'x')} of the Python server's "
                        f"(at {', '.join(str(c) for c, a, b in slower if a and b and a / b == worst)})",
            "met": None if missing else all(a <= b for _, a, b in slower),
        },
    ]  # fmt: skip


def answers_ok(results: dict) -> bool:
    return all(d <= ANSWER_TOLERANCE for r in results["answers"].values() for d in r.values())


# --- Markdown ------------------------------------------------------------------------------


def verdict(met) -> str:
    return "n/a" if met is None else "**met**" if met else "**missed**"


def result_table(results: dict) -> list:
    s, summary = results["settings"], results["summary"]
    lines = [
        "| Context | Server | ms/token p50 | p99 | p50 vs Python | p99 vs Python | Bytes/step "
        "| vs Python | Server CPU s/token | vs Python |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [s["prefill"]] + list(s["contexts"]):
        for name, c in CONFIGS.items():
            r = summary[name]["rows"][str(row)]
            v = r["vs_python"]
            vs = (lambda k: "1" if name == "python" else common.fmt(v[k], 2, "x"))  # noqa: E731
            lines.append(
                f"| {row:,} | {c.label} | {common.fmt(r['ms_p50'], 2)} | {common.fmt(r['ms_p99'], 2)} "
                f"| {vs('ms_p50')} | {vs('ms_p99')} | {common.fmt(r['bytes_per_step'], 0)} "
                f"| {vs('bytes_per_step')} | {common.fmt(r['server_cpu_s_per_token'], 4)} "
                f"| {vs('server_cpu_s_per_token')} |"
            )
    return lines


def notes(results: dict) -> list:
    lines = []
    summary = results["summary"]
    prefill = ", ".join(f"{c.label} {common.fmt(summary[n]['prefill_ms'], 1)} ms" for n, c in CONFIGS.items())
    lines.append(f"- Prefill of {results['settings']['prefill']} positions (median of the sequences): {prefill}.")
    worst = {n: max((r.get(n, 0.0) for r in results["answers"].values()), default=None)
             for n in CONFIGS if n != "python"}  # fmt: skip
    agree = "agree" if answers_ok(results) else "**differ**"
    lines.append(
        "- Answers " + agree + ": the largest |difference| of a returned hidden state from the "
        "Python server's, over every step: "
        + ", ".join(f"{CONFIGS[n].label} {common.fmt(d, 7) if d is not None else 'n/a'}" for n, d in worst.items())
        + f" (tolerance {ANSWER_TOLERANCE:g})."
    )
    for name, c in CONFIGS.items():
        seqs = results["sequences"][name]
        if seqs:
            last = seqs[-1]["last_reply"]
            what = ("a handle" if last["cache_elements"] == 0 else "the whole cache")
            lines.append(f"- {c.label}: the last reply's present_key_values is {what}: "
                         f"{last['cache_entries']} entries, key shape {last['key_shape']}, "
                         f"{last['cache_elements']:,} elements; a sequence took "
                         f"{common.fmt(sum(q['wall_s'] for q in seqs) / len(seqs), 1)} s.")  # fmt: skip
    busy = [(n, q["other_cores"]) for n in CONFIGS for q in results["sequences"][n]
            if (q.get("other_cores") or 0) > OTHER_LOAD_NOTE]  # fmt: skip
    if busy:
        lines.append(f"- Other load on the machine during {len(busy)} sequence(s) (up to "
                     f"{max(b for _, b in busy):.2f} cores beside server and client): those numbers are "
                     "less reliable.")  # fmt: skip
    return lines


def render_markdown(results: dict) -> str:
    s = results["settings"]
    quick = results.get("quick")
    lines = [
        "# A split GPT-2 trunk: splitserve (with and without KV sessions) vs the Python server",
        "",
        "Generated by `scripts/bench/llm.py`; do not edit by hand. Reproduce with `make bench-llm` "
        "(which runs `.venv/bin/python scripts/bench/llm.py`), alone on the machine. This report "
        "came from:",
        "",
        f"    {results['command']}",
        "",
        f"Raw results: `{results['raw_results']}`. The run took {common.fmt(results.get('duration_s'), 0)} s.",
        "",
    ]
    if quick:
        lines += ["**A --quick run: small contexts, a smoke test of the script, not a measurement.**", ""]
    facts = results["machine"]
    lines += common.machine_lines(facts)
    lines += [f"- transformers {facts.get('transformers')}", ""]
    lines += [
        "## How it was measured",
        "",
        f"- The trunk: `{s['trunk']}` (GPT-2 small's layers 2..9: 8 blocks, width 768, 12 heads "
        "of 64; random weights), exported once and served by all three.",
        "- The client: splitlearn_comm's loop, unchanged (`compute_with_cache(..., use_cache=True)`): "
        "the float32 TensorCodec, the reply's present_key_values sent back as the next "
        "past_key_values, one call at a time on one channel, in this script's process on the same "
        "machine.",
        f"- A sequence: a prefill of {s['prefill']} positions, then one position per step until the "
        f"past holds {max(s['contexts']):,}. A step's context is the past it is sent with. Row "
        f"{s['prefill']}: the first {s['window']} decode steps; every other row: the "
        f"{s['window']} steps ending at that context. {s['repeats']} sequence(s) per server, the "
        "servers taking turns; every server gets the same inputs in the same sequence. "
        f"{s['warmup_steps']} untimed decode steps per server before the first.",
        "- ms/token: the client's whole call (encode, RPC, decode) per decode step; p50 and p99 over "
        f"the row's steps of every sequence ({s['window'] * s['repeats']} per row and server). Bytes/step: the serialized request plus response "
        "(protobuf, without HTTP/2 framing) of the step at exactly that context. Server CPU: "
        "utime+stime of the server process (/proc/PID/stat) over the row's steps, per token; the "
        "two splitserve rows share one process, measured in turn.",
        "- Ratios: splitserve / Python from this run (below 1: splitserve is faster, sends less, "
        "uses less CPU).",
        "",
        "Servers:",
        "",
    ]
    lines += [f"- {c.label}: {c.description}" for c in CONFIGS.values()]
    lines += ["", "## Results", ""]
    if "summary" in results:
        lines += result_table(results) + [""] + notes(results) + [""]
        lines += ["## Targets", "", "| Target | Measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {verdict(t['met'])} |" for t in results["targets"]]
    else:
        lines += ["The run did not finish; see the raw results."]
    return "\n".join(lines) + "\n"


# --- Arguments -------------------------------------------------------------------------------


def parse_contexts(text: str) -> list:
    try:
        values = sorted({int(v.replace("_", "")) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("contexts are whole numbers, e.g. 128,512,1000") from None
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: contexts {','.join(map(str, QUICK_CONTEXTS))}, windows of "
                        f"{QUICK_WINDOW}, {QUICK_REPEATS} sequence, results in the temp dir")
    p.add_argument("--contexts", type=parse_contexts, default=None,
                   help=f"contexts reported beside the prefill's (default {','.join(map(str, CONTEXTS))})")
    p.add_argument("--prefill", type=int, default=PREFILL, help=f"prompt positions (default {PREFILL})")
    p.add_argument("--window", type=int, default=None, help=f"decode steps per context and sequence (default {WINDOW})")
    p.add_argument("--repeats", type=int, default=None, help=f"sequences per server (default {REPEATS})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"untimed decode steps per server first (default {WARMUP_STEPS})")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help=f"seconds to wait for an idle machine before each sequence "
                        f"(default {QUIET_WAIT_S:g}; not with --quick)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help=f"where the trunk is exported once (default {DEFAULT_CACHE})")
    p.add_argument("--out", default=None,
                   help=f"raw results JSON (default {DEFAULT_OUT}; with --quick, in the temp dir)")
    p.add_argument("--markdown", default=None,
                   help=f"the report (default {DEFAULT_MARKDOWN}; with --quick, in the temp dir)")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="render --markdown from an earlier run's JSON; measure nothing")
    args = p.parse_args(argv)  # fmt: skip
    q = args.quick
    args.contexts = args.contexts or list(QUICK_CONTEXTS if q else CONTEXTS)
    args.window = args.window or (QUICK_WINDOW if q else WINDOW)
    args.repeats = args.repeats or (QUICK_REPEATS if q else REPEATS)
    if args.warmup_steps is None:
        args.warmup_steps = QUICK_WARMUP_STEPS if q else WARMUP_STEPS
    if args.prefill < 1 or args.window < 1 or args.repeats < 1:
        p.error("--prefill, --window and --repeats must be at least 1")
    if min(args.contexts) < args.prefill + args.window:
        p.error(f"every context must be at least --prefill + --window ({args.prefill + args.window})")
    if max(args.contexts) >= 1024:
        p.error("GPT-2 holds 1,024 positions: the largest context must be below 1024")
    scratch = Path(tempfile.gettempdir())
    args.out = args.out or (str(scratch / "splitserve-bench-llm-quick.json") if q else DEFAULT_OUT)
    args.markdown = args.markdown or (str(scratch / "splitserve-bench-llm-quick.md") if q else DEFAULT_MARKDOWN)
    given = argv if argv is not None else sys.argv[1:]
    args.command = common.scrub(" ".join(
        [".venv/bin/python", "scripts/bench/llm.py"] + [shlex.quote(a) for a in given]))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if results.get("sequences") and all(results["sequences"].values()):
            results["summary"] = summarize(results)
            results["targets"] = check_targets(results)
    else:
        atexit.register(common._kill_leftovers)
        signal.signal(signal.SIGTERM, common._exit_on_sigterm)
        try:
            results = run_all(args)
        except BenchError as e:
            sys.exit(f"bench-llm: {common.scrub(str(e))}")
    markdown = Path(args.markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(results))
    progress("wrote " + " and ".join(common.display_path(p) for p in
                                     ([markdown] if args.from_json else [Path(args.out), markdown])))  # fmt: skip
    if "targets" not in results:
        return 1
    for t in results["targets"]:
        progress(f"  {verdict(t['met']).strip('*')}: {t['target']}: {t['measured']}")
    if not answers_ok(results):
        progress("the servers' answers differ (see the report)")
        return 1
    if not results.get("quick") and not all(t["met"] for t in results["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

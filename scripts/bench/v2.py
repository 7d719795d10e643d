"""Open Inference Protocol (KServe v2) benchmark: splitserve against MLServer and
Triton, same TorchScript model, same machine, same run, one load generator.

Every server runs tests/fixtures/generated/mlp512.pt (input 1x512 FP32) on the
CPU and is started fresh for its cell on free loopback ports. perf_analyzer
(from the tritonclient wheel) drives each over gRPC v2 at 32 concurrent
requests: first a short warm-up run, then the measured run (3 windows). It
needs a server's ModelConfig, which MLServer lacks, so the MLServer process
adds it (scripts/bench/peers/mlserver_server.py). splitserve's own
ComputeService is measured in the same run with `splitserve bench`, for the
comparison of the two protocols on the same server. Before measuring, each v2
server answers one request, checked against torch running the same file.

Besides throughput and latency, each run records the CPU time that the
server's processes and the load generator used during the measured run: on a
machine where both share the cores, that says where the time went. Three
rounds through all servers; each server's row is its median run. Before each
run the script waits for the machine to be idle, and measures a run again when
it failed or something else used the CPU beside it.

Writes the raw results as JSON (docs/benchmarks-v2.json) and renders them as a
section of docs/benchmarks.md, between markers that scripts/bench/run.py keeps
when it rewrites the rest of that file.

Set-up (scripts/bench/setup.sh, run by `make bench-v2`): .venv-bench holds
perf_analyzer, .venv-peers MLServer, PyTriton (Triton) and torch.

Usage (from the repository root; `make bench-v2` runs the first line):
  .venv/bin/python scripts/bench/v2.py
  .venv/bin/python scripts/bench/v2.py --quick       # smoke test, writes to the temp dir
  .venv/bin/python scripts/bench/v2.py --servers splitserve mlserver --duration 6
  .venv/bin/python scripts/bench/v2.py --from-json docs/benchmarks-v2.json   # re-render only
"""

import argparse
import atexit
import contextlib
import json
import os
import re
import resource
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

ROOT = common.ROOT
BIN = common.BIN
BENCH_VENV = ROOT / ".venv-bench"
PEERS_VENV = ROOT / ".venv-peers"
PERF_ANALYZER = BENCH_VENV / "bin" / "perf_analyzer"
PEERS_PY = PEERS_VENV / "bin" / "python"
SETUP = "scripts/bench/setup.sh"

MODEL_NAME = "mlp"
MODEL_PATH = "tests/fixtures/generated/mlp512.pt"
SHAPE = (1, 512)
CONCURRENCY = 32
MAX_BATCH = 64  # rows per batched forward, every server's batched configuration
MLSERVER_BATCH_TIME_S = 0.001  # MLServer's adaptive batching needs a wait above 0

DEFAULT_DURATION_S = 9.0
QUICK_DURATION_S = 1.5
DEFAULT_REPEAT = 3
WARMUP_S = 1.0
WINDOWS = 3  # perf_analyzer reports the mean of its last 3 windows
MAX_CONNECTIONS = 4  # `splitserve bench`'s HTTP/2 connections
READY_TIMEOUT_S = 180.0
SETTLE_S = 1.0
QUIET_WINDOW_S = 2.0
QUIET_MAX_CORES = 0.15  # busy cores below which the machine counts as idle
DEFAULT_QUIET_WAIT_S = 300.0
OTHER_LOAD_NOTE = 0.2  # cores used by neither server nor load generator: measure again
DEFAULT_RETRIES = 2
DEFAULT_OUT = "docs/benchmarks-v2.json"
DEFAULT_MARKDOWN = "docs/benchmarks.md"
SCHEMA_VERSION = 1

# Targets of the comparison, at 32 concurrent requests.
TARGET_PEER_THROUGHPUT = 5.0  # splitserve v2 throughput >= 5x each peer's
TARGET_PEER_P99 = 1 / 5  # splitserve v2 p99 <= 1/5 of each peer's
TARGET_COMPUTE_FRACTION = 0.9  # splitserve v2 throughput within 10% of ComputeService's

BEGIN = "<!-- begin: scripts/bench/v2.py (generated; do not edit by hand) -->"
END = "<!-- end: scripts/bench/v2.py -->"


@dataclass(frozen=True)
class Server:
    name: str
    family: str  # splitserve, mlserver, triton
    protocol: str  # v2 (perf_analyzer) or compute (`splitserve bench`)
    batched: bool
    label: str
    description: str


SERVERS = {
    s.name: s
    for s in (
        Server("splitserve", "splitserve", "v2", False, "splitserve v2",
               "`splitserve serve` with its default thread plan, no batching; "
               "`inference.GRPCInferenceService`"),
        Server("splitserve-batched", "splitserve", "v2", True, "splitserve v2 batched",
               f"`splitserve serve --max-batch-size {MAX_BATCH} --batch-timeout-us 0`"),
        Server("mlserver", "mlserver", "v2", False, "MLServer",
               "MLServer with a custom runtime (torch.jit.load, forward under no_grad), MLServer's "
               "defaults (one inference worker process), access logs off"),
        Server("mlserver-batched", "mlserver", "v2", True, "MLServer batched",
               f"the same with adaptive batching: max_batch_size {MAX_BATCH}, "
               f"max_batch_time {MLSERVER_BATCH_TIME_S * 1000:g} ms (MLServer needs a wait above 0)"),
        Server("triton", "triton", "v2", False, "Triton",
               "tritonserver 2.51 (bundled by nvidia-pytriton), the model a PyTriton Python "
               "function on Triton's Python backend (forward under no_grad), batching off"),
        Server("triton-batched", "triton", "v2", True, "Triton batched",
               f"the same with max_batch_size {MAX_BATCH} and Triton's dynamic batcher "
               "(max_queue_delay 0)"),
        Server("splitserve-compute", "splitserve", "compute", False, "splitserve ComputeService",
               "`splitserve serve` as above, driven over `splitlearn.comm.ComputeService` by "
               "`splitserve bench`"),
        Server("splitserve-compute-batched", "splitserve", "compute", True,
               "splitserve ComputeService batched",
               f"`--max-batch-size {MAX_BATCH} --batch-timeout-us 0`, `splitserve bench`"),
    )
}  # fmt: skip

RunError = common.RunError


# --- Processes ------------------------------------------------------------------


def proc_stat(pid: int):
    """(ppid, CPU seconds) of a live process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def descendants(root: int) -> dict:
    """CPU seconds of a process and every live descendant, by pid."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (s := proc_stat(int(entry.name))):
            stats[int(entry.name)] = s
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid][1]
            frontier += [p for p, (ppid, _) in stats.items() if ppid == pid]
    return tree


def cpu_delta(before: dict, after: dict) -> float:
    """CPU seconds the tree used between two snapshots (processes gone by then are missed)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_s: float) -> dict:
    """Waits (at most max_s) until the machine is idle over a 2 s window: another job's
    compile or test run beside the benchmark would skew it."""
    started = time.monotonic()
    while True:
        busy, t0 = machine_busy(), time.monotonic()
        time.sleep(QUIET_WINDOW_S)
        cores = (machine_busy() - busy) / (time.monotonic() - t0)
        waited = time.monotonic() - started
        if cores <= QUIET_MAX_CORES or waited >= max_s:
            return {"busy_cores": cores, "waited_s": waited, "quiet": cores <= QUIET_MAX_CORES}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def kill_tree(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def server_argv(server: Server, ports: dict) -> list:
    shape = "x".join(map(str, SHAPE))
    if server.family == "splitserve":
        argv = [
            str(BIN), "serve",
            "--grpc-addr", f"127.0.0.1:{ports['grpc']}",
            "--http-addr", f"127.0.0.1:{ports['http']}",
            "--metrics-addr", f"127.0.0.1:{ports['metrics']}",
            "--model", f"{MODEL_NAME}={MODEL_PATH}",
            "--warmup-shape", f"{MODEL_NAME}={shape}",
        ]  # fmt: skip
        if server.batched:
            argv += ["--max-batch-size", str(MAX_BATCH), "--batch-timeout-us", "0"]
        return argv
    script = HERE / "peers" / f"{server.family}_server.py"
    argv = [
        str(PEERS_PY), str(script),
        "--model", MODEL_PATH,
        "--name", MODEL_NAME,
        "--shape", shape,
        "--grpc-port", str(ports["grpc"]),
        "--http-port", str(ports["http"]),
        "--metrics-port", str(ports["metrics"]),
    ]  # fmt: skip
    if server.batched:
        argv += ["--max-batch-size", str(MAX_BATCH)]
        if server.family == "mlserver":
            argv += ["--max-batch-time", str(MLSERVER_BATCH_TIME_S)]
    return argv


def model_ready(addr: str) -> bool:
    import tritonclient.grpc as grpcclient  # the project venv's client

    with contextlib.suppress(Exception):
        client = grpcclient.InferenceServerClient(addr)
        try:
            return bool(client.is_model_ready(MODEL_NAME, client_timeout=1.0))
        finally:
            client.close()
    return False


def wait_ready(server: Server, proc: subprocess.Popen, addr: str, stderr_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunError(f"{server.name} exited {proc.returncode} at start: {common.tail(stderr_path)}")
        if model_ready(addr):
            return
        time.sleep(0.2)
    raise RunError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s: {common.tail(stderr_path)}")


@contextlib.contextmanager
def running_server(server: Server, logdir: Path):
    """Starts the server on free loopback ports, yields (proc, grpc addr), always stops it
    and every process it started."""
    ports = {k: common.free_port() for k in ("grpc", "http", "metrics")}
    addr = f"127.0.0.1:{ports['grpc']}"
    stem = logdir / f"{server.name}-{ports['grpc']}"
    out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
    env = dict(os.environ)
    # The peers' Python (and Triton's Python backend) must not see the project venv.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            server_argv(server, ports),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            process_group=0,
            preexec_fn=common._die_with_parent,
        )
    common._LIVE.add(proc)
    seen = set()
    try:
        wait_ready(server, proc, addr, err_path)
        seen |= set(descendants(proc.pid))
        yield proc, addr
    finally:
        seen |= set(descendants(proc.pid))
        common.stop_process(proc)
        kill_tree(seen - {proc.pid})  # e.g. tritonserver, in a session of its own


# --- Load -----------------------------------------------------------------------


def perf_analyzer_env() -> dict:
    """perf_analyzer loads libcudart.so.12 even for a CPU server: the wheel's copy."""
    libs = sorted(BENCH_VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(p) for p in libs] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    return env


def input_data(path: Path) -> Path:
    """One request's input for perf_analyzer: seeded uniform [0, 1) floats, the same for
    every server (perf_analyzer's own random bytes include NaNs, which MLServer rejects)."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.random(int(np.prod(SHAPE)), dtype=np.float32)
    path.write_text(json.dumps({"data": [{"INPUT__0": data.tolist()}]}))
    return path


PA_FIELDS = {
    "request_count": r"Request count:\s*([\d.]+)",
    "throughput_rps": r"Throughput:\s*([\d.]+) infer/sec",
    "avg_us": r"Avg latency:\s*([\d.]+) usec",
    "p50_us": r"p50 latency:\s*([\d.]+) usec",
    "p90_us": r"p90 latency:\s*([\d.]+) usec",
    "p95_us": r"p95 latency:\s*([\d.]+) usec",
    "p99_us": r"p99 latency:\s*([\d.]+) usec",
}


def parse_perf_analyzer(text: str) -> dict:
    """The client-side section of perf_analyzer's report (printed before the
    server-side one, which some servers' statistics make perf_analyzer abort)."""
    client = text.split("Client:", 1)[1] if "Client:" in text else ""
    found = {}
    for key, pattern in PA_FIELDS.items():
        m = re.search(pattern, client)
        found[key] = float(m.group(1)) if m else None
    if found["throughput_rps"] is None or found["p99_us"] is None:
        return {}
    server = text.split("Server:", 1)[1] if "Server:" in text else ""
    m = re.search(r"Avg request latency:\s*([\d.]+) usec \((.*)\)", server)
    return {
        "throughput_rps": found["throughput_rps"],
        "requests": int(found["request_count"] or 0),
        "latency_ms": {k[:-3]: found[k] / 1000 for k in ("avg_us", "p50_us", "p90_us", "p95_us", "p99_us")
                       if found[k] is not None},
        "server_side": m.group(0) if m else None,
    }  # fmt: skip


def perf_analyzer(addr: str, data: Path, window_s: float, what: str) -> dict:
    argv = [
        str(PERF_ANALYZER),
        "-m", MODEL_NAME,
        "-u", addr,
        "-i", "grpc",
        "--async",
        # One client thread keeps all 32 requests in flight: the cheapest on the
        # shared cores (16 threads, the default, cost about 1.5x the CPU per request).
        "--max-threads", "1",
        "--concurrency-range", str(CONCURRENCY),
        "--input-data", str(data),
        "--measurement-mode", "time_windows",
        "--measurement-interval", str(max(1, int(round(window_s * 1000)))),
        # Never "unstable": exactly 3 windows, a fixed duration for every server.
        "--stability-percentage", "1000",
        "--max-trials", str(WINDOWS),
    ]  # fmt: skip
    timeout_s = WINDOWS * window_s + 120
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=perf_analyzer_env(), capture_output=True, text=True,
                              timeout=timeout_s, preexec_fn=common._die_with_parent)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RunError(f"{what} did not finish in {timeout_s:.0f} s") from None
    except OSError as e:
        raise RunError(f"{what} could not start: {e} (run {SETUP})") from None
    wall_s = time.monotonic() - started
    result = parse_perf_analyzer(done.stdout)
    if not result:
        reason = common.last_lines(done.stdout + "\n" + done.stderr, 2)
        raise RunError(f"{what} exited {done.returncode} without a measurement: {reason}")
    result["exit_code"] = done.returncode
    if done.returncode != 0:
        result["abort"] = common.last_lines(done.stderr or done.stdout, 1)
    result["wall_s"] = wall_s
    result["command"] = "perf_analyzer " + " ".join(
        shlex.quote(a) for a in argv[1:] if not a.startswith("127.0.0.1:") and a != str(data)
    )
    return result


def splitserve_bench(addr: str, duration_s: float, warmup_s: float) -> dict:
    argv = [
        str(BIN), "bench",
        "--addr", addr,
        "--concurrency", str(CONCURRENCY),
        "--connections", str(min(MAX_CONNECTIONS, CONCURRENCY)),
        "--duration", common.as_duration(duration_s),
        "--warmup", common.as_duration(warmup_s),
        "--shape", "x".join(map(str, SHAPE)),
        "--model-id", MODEL_NAME,
        "--json",
    ]  # fmt: skip
    started = time.monotonic()
    b = common.run_json(argv, warmup_s + duration_s + 120, "splitserve bench")
    lat = b.get("latency_ms") or {}
    return {
        "throughput_rps": b.get("throughput_rps"),
        "requests": b.get("requests") or b.get("ok"),
        "latency_ms": {k: lat.get(k) for k in ("mean", "p50", "p90", "p99") if lat.get(k) is not None},
        "errors": b.get("errors"),
        "wall_s": time.monotonic() - started,
        "warmup_s": warmup_s,
        "raw": b,
        "command": "splitserve " + " ".join(shlex.quote(a) for a in argv[1:] if not a.startswith("127.0.0.1:")),
    }


def check_answer(addr: str) -> dict:
    """One ModelInfer with a fixed input, compared with torch running the same file."""
    import numpy as np
    import torch
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    with torch.no_grad():
        want = torch.jit.load(str(ROOT / MODEL_PATH)).eval()(torch.from_numpy(x)).numpy()
    client = grpcclient.InferenceServerClient(addr)
    try:
        meta = client.get_server_metadata()
        tensor = grpcclient.InferInput("INPUT__0", list(SHAPE), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer(MODEL_NAME, [tensor]).as_numpy("OUTPUT__0")
    except Exception as e:  # noqa: BLE001  (any client error fails the cell)
        raise RunError(f"ModelInfer failed: {e}") from None
    finally:
        client.close()
    if got is None or got.shape != want.shape:
        raise RunError(f"ModelInfer answered shape {None if got is None else got.shape}, torch {want.shape}")
    diff = float(np.max(np.abs(got - want)))
    if diff > 1e-4:
        raise RunError(f"ModelInfer answer differs from torch by up to {diff:g}")
    return {"max_abs_diff": diff, "server": f"{meta.name} {meta.version}"}


def measure(server: Server, args, logdir: Path, data: Path) -> dict:
    cell = {"server": server.name, "load": None, "warmup": None, "check": None, "cpu": None,
            "threads_at_ready": None, "error": None}  # fmt: skip
    try:
        with running_server(server, logdir) as (proc, addr):
            cell["threads_at_ready"] = common.read_threads(proc.pid)
            if server.protocol == "v2":
                cell["check"] = check_answer(addr)
                warm = perf_analyzer(addr, data, args.warmup / WINDOWS, "perf_analyzer warm-up")
                cell["warmup"] = {k: warm.get(k) for k in ("throughput_rps", "exit_code", "wall_s")}
            before, gen_before, busy_before = descendants(proc.pid), children_cpu(), machine_busy()
            if server.protocol == "v2":
                load = perf_analyzer(addr, data, args.duration / WINDOWS, "perf_analyzer")
            else:
                load = splitserve_bench(addr, args.duration, args.warmup)
            after, gen_after, busy_after = descendants(proc.pid), children_cpu(), machine_busy()
            cell["load"] = load
            # CPU over the whole load run (for `splitserve bench`, its warm-up too, which
            # runs at about the measured rate), per request at the measured rate.
            wall_s, rps = load["wall_s"], load["throughput_rps"]
            server_cpu, gen_cpu = cpu_delta(before, after), gen_after - gen_before
            cell["cpu"] = {
                "wall_s": wall_s,
                "server_s": server_cpu,
                "load_generator_s": gen_cpu,
                "server_cores": server_cpu / wall_s,
                "load_generator_cores": gen_cpu / wall_s,
                "server_us_per_request": server_cpu / (rps * wall_s) * 1e6 if rps else None,
                "load_generator_us_per_request": gen_cpu / (rps * wall_s) * 1e6 if rps else None,
                # Everything else the machine did meanwhile (the kernel's share of loopback
                # networking included): a check that nothing else skewed the run.
                "other_cores": max(0.0, busy_after - busy_before - server_cpu - gen_cpu) / wall_s,
            }
    except RunError as e:
        cell["error"] = common.scrub(str(e))
    return cell


# --- Comparison -----------------------------------------------------------------


def ok(cells: dict, name: str):
    c = cells.get(name)
    return c["load"] if c and c["load"] and not c["error"] else None


def pair(cells: dict, mine: str, other: str) -> dict:
    a, b = ok(cells, mine), ok(cells, other)
    if not a or not b:
        return None
    return {
        "server": mine,
        "vs": other,
        "throughput_rps": a["throughput_rps"],
        "vs_throughput_rps": b["throughput_rps"],
        "throughput_ratio": common.ratio(a["throughput_rps"], b["throughput_rps"]),
        "p50_ms": a["latency_ms"].get("p50"),
        "vs_p50_ms": b["latency_ms"].get("p50"),
        "p50_ratio": common.ratio(a["latency_ms"].get("p50"), b["latency_ms"].get("p50")),
        "p99_ms": a["latency_ms"].get("p99"),
        "vs_p99_ms": b["latency_ms"].get("p99"),
        "p99_ratio": common.ratio(a["latency_ms"].get("p99"), b["latency_ms"].get("p99")),
    }


def best_of(cells: dict, family: str):
    """The peer configuration with the highest throughput (the strictest comparison)."""
    names = [n for n, s in SERVERS.items() if s.family == family and ok(cells, n)]
    return max(names, key=lambda n: ok(cells, n)["throughput_rps"]) if names else None


def median_cells(results: dict) -> dict:
    """Per server, the run with the median throughput (of those that measured; the
    last failure when none did). With an even count, the lower of the middle two."""
    by_server = {}
    for c in results["cells"]:
        by_server.setdefault(c["server"], []).append(c)
    chosen = {}
    for name, runs in by_server.items():
        good = sorted((c for c in runs if c["load"] and not c["error"]),
                      key=lambda c: c["load"]["throughput_rps"])  # fmt: skip
        chosen[name] = good[(len(good) - 1) // 2] if good else runs[-1]
    return chosen


def runs_of(results: dict, name: str) -> list:
    return [c for c in results["cells"] if c["server"] == name]


def compute_targets(results: dict) -> dict:
    cells = median_cells(results)
    out = {"peers": [], "compute": []}
    for family in ("mlserver", "triton"):
        best = best_of(cells, family)
        for mine in ("splitserve", "splitserve-batched"):
            p = pair(cells, mine, best) if best else None
            if p:
                p["throughput_met"] = p["throughput_ratio"] >= TARGET_PEER_THROUGHPUT
                p["p99_met"] = p["p99_ratio"] is not None and p["p99_ratio"] <= TARGET_PEER_P99
            out["peers"].append(p or {"server": mine, "vs_family": family, "missing": True})
    for mine, other in (("splitserve", "splitserve-compute"),
                        ("splitserve-batched", "splitserve-compute-batched")):  # fmt: skip
        p = pair(cells, mine, other)
        if p:
            p["throughput_met"] = p["throughput_ratio"] >= TARGET_COMPUTE_FRACTION
        out["compute"].append(p or {"server": mine, "vs": other, "missing": True})
    return out


# --- Markdown -------------------------------------------------------------------


fmt = common.fmt


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def label(name: str) -> str:
    return SERVERS[name].label if name in SERVERS else name


def verdict(met) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


def cell_row(c: dict, runs: list) -> str:
    s = SERVERS[c["server"]]
    gen = "perf_analyzer" if s.protocol == "v2" else "`splitserve bench`"
    every = ", ".join(fmt(r["load"]["throughput_rps"], 0) if r["load"] and not r["error"] else "failed"
                      for r in runs)  # fmt: skip
    if c["error"]:
        failed = c["error"].replace("|", "/")
        return f"| {s.label} | {gen} | n/a | {every} | n/a | n/a | n/a | n/a | n/a | failed: {failed} |"
    load, cpu = c["load"], c["cpu"] or {}
    lat = load["latency_ms"]
    note = []
    if load.get("exit_code"):
        note.append(f"perf_analyzer aborted (exit {load['exit_code']}) after its client-side report, see below")
    for r in runs:
        if r["error"]:
            note.append(f"round {r.get('round', '?')} failed: {r['error']}")
    other = cpu.get("other_cores")
    if other is not None and other >= OTHER_LOAD_NOTE:
        note.append(f"other CPU use on the machine meanwhile: {other:.2f} cores")
    errors = load.get("errors")
    if isinstance(errors, dict) and sum(errors.values()):
        note.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    return (
        f"| {s.label} | {gen} | {fmt(load['throughput_rps'], 0)} | {every} | {fmt(lat.get('p50'), 2)} "
        f"| {fmt(lat.get('p99'), 2)} | {fmt(cpu.get('server_cores'), 2)} "
        f"| {fmt(cpu.get('load_generator_cores'), 2)} | {fmt(cpu.get('server_us_per_request'), 0)} "
        f"| {'; '.join(note).replace('|', '/') or '-'} |"
    )


def target_rows(t: dict) -> list:
    rows = []
    for p in t["peers"]:
        if p.get("missing"):
            rows.append(f"| {label(p['server'])} vs {p['vs_family']} | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        rows.append(
            f"| {label(p['server'])} vs {label(p['vs'])} | {fmt(p['throughput_rps'], 0)} "
            f"| {fmt(p['vs_throughput_rps'], 0)} | **{fmt(p['throughput_ratio'], 2, 'x')}** "
            f"| {verdict(p['throughput_met'])} (>= {TARGET_PEER_THROUGHPUT:g}x) "
            f"| {fmt(p['p50_ratio'], 3, 'x')} | **{fmt(p['p99_ratio'], 3, 'x')}** "
            f"| {verdict(p['p99_met'])} (<= {TARGET_PEER_P99:g}x) |"
        )
    return rows


def render_section(results: dict) -> str:
    facts, s, t = results["machine"], results["settings"], results["targets"]
    dirty = " (with uncommitted changes)" if facts.get("git_dirty") else ""
    v = results.get("versions", {})
    lines = [
        BEGIN,
        "",
        "## Open Inference Protocol (KServe v2): splitserve vs MLServer and Triton",
        "",
        "Generated by `scripts/bench/v2.py` (`make bench-v2`, part of `make bench`); raw results: "
        f"`{results['raw_results']}`. This section came from:",
        "",
        f"    {results['command']}",
        "",
        f"- Date {facts['date']}, commit {facts['git_commit'] or 'unknown'}{dirty}, "
        f"{(facts['splitserve'] or 'splitserve').splitlines()[0]}; {facts['cpu_model']}, "
        f"nproc {facts['nproc']}, "
        f"Linux {facts['kernel']}.",
        f"- Peers: mlserver {v.get('mlserver')}, nvidia-pytriton {v.get('nvidia-pytriton')} "
        f"({server_version(results, 'triton')}), torch {v.get('torch')} in `.venv-peers`; "
        f"load: perf_analyzer {v.get('perf_analyzer')} (tritonclient {v.get('tritonclient')}, "
        "`.venv-bench`). Set up by `scripts/bench/setup.sh`.",
        f"- Model: `{MODEL_PATH}` (3 Linear 512x512 + ReLU), input {SHAPE[0]}x{SHAPE[1]} FP32, "
        "on the CPU, the same file for every server; each v2 server's answer to one fixed input "
        "was checked against torch before it was measured.",
        f"- Load: {s['concurrency']} concurrent requests, closed loop, on the same 2 cores as the "
        f"server. perf_analyzer (`--async --max-threads 1`, one gRPC connection, its input a fixed seeded [0, 1) "
        f"vector) drives every v2 server: a {fmt(s['warmup_s'])} s warm-up run, then "
        f"{s['windows']} windows of {fmt(s['duration_s'] / s['windows'], 1)} s "
        f"({fmt(s['duration_s'])} s measured). The ComputeService rows use `splitserve bench` "
        f"(the load generator of the tables above, {s['max_connections']} connections), "
        f"{fmt(s['warmup_s'])} s warm-up and {fmt(s['duration_s'])} s measured. Every run "
        f"starts its server fresh; {plural(s.get('repeat', 1), 'round')} through all servers, one after "
        "the other, and each row is the server's median run by throughput (every run's "
        "throughput beside it). Ratios compare medians.",
        "- CPU columns: CPU time of the server's processes (all of them: MLServer's worker, "
        "tritonserver and its Python stub) and of the load generator during the measured run, "
        "divided by its wall time (cores busy), and the server's CPU per answered request. "
        f"Before each run the script waits (at most {fmt(s.get('quiet_wait_s'), 0)} s) until the "
        f"machine is idle; a run that failed, or beside which something else used "
        f"{OTHER_LOAD_NOTE:g} cores or more, is measured again (at most {s.get('retries', 0)} "
        f"times; {plural(len(results.get('disturbed', [])), 'such run')} in this report, kept in "
        "the JSON), and the notes name any that remained.",
        "",
        "Servers:",
        "",
    ]
    lines += [f"- {SERVERS[n].label}: {SERVERS[n].description}" for n in s["servers"]]
    if results.get("binary_rebuilt_during_run"):
        lines += ["", "**Warning: the splitserve binary was rebuilt during this run; its rows may "
                  "mix two builds.**"]  # fmt: skip
    lines += [
        "",
        f"### Results at {s['concurrency']} concurrent requests",
        "",
        "| Server | Load generator | Throughput (rps) | Every run (rps) | p50 (ms) | p99 (ms) "
        "| Server cores | Load generator cores | Server CPU per request (us) | Notes |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    medians = median_cells(results)
    lines += [cell_row(medians[n], runs_of(results, n)) for n in s["servers"] if n in medians]
    lines += [
        "",
        "### Targets",
        "",
        "splitserve over v2 against each peer's best configuration in this run (the one with "
        "the higher throughput). Throughput ratio: splitserve / peer; p50 and p99 ratios: "
        "splitserve / peer (below 1 = splitserve faster).",
        "",
        "| Comparison | splitserve rps | peer rps | Throughput ratio | Target | p50 ratio "
        "| p99 ratio | Target |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    lines += target_rows(t)
    lines += [
        "",
        "splitserve over v2 (perf_analyzer) against its own ComputeService (`splitserve bench`): "
        "throughput ratio v2 / ComputeService, target at least "
        f"{TARGET_COMPUTE_FRACTION:.0%}; and the server's CPU per request on each path, which "
        "does not depend on the load generator.",
        "",
        "| Comparison | v2 rps | ComputeService rps | Ratio | Target | v2 server CPU/request (us) "
        "| ComputeService server CPU/request (us) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    cells = median_cells(results)
    for p in t["compute"]:
        if p.get("missing"):
            lines.append(f"| {label(p['server'])} vs {label(p['vs'])} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        cpu_a = (cells[p["server"]].get("cpu") or {}).get("server_us_per_request")
        cpu_b = (cells[p["vs"]].get("cpu") or {}).get("server_us_per_request")
        lines.append(
            f"| {label(p['server'])} vs {label(p['vs'])} | {fmt(p['throughput_rps'], 0)} "
            f"| {fmt(p['vs_throughput_rps'], 0)} | **{fmt(p['throughput_ratio'] * 100, 0, '%')}** "
            f"| {verdict(p['throughput_met'])} (>= {TARGET_COMPUTE_FRACTION:.0%}) "
            f"| {fmt(cpu_a, 0)} | {fmt(cpu_b, 0)} |"
        )
    lines += ["", "### What the numbers show", ""] + [f"- {f}" for f in findings(results)]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def server_version(results: dict, family: str) -> str:
    """What the family's servers said in ServerMetadata, e.g. `triton 2.51.0`."""
    said = {(c.get("check") or {}).get("server") for c in results["cells"]
            if SERVERS[c["server"]].family == family} - {None}  # fmt: skip
    return ", ".join(sorted(said)) or "version not reported"


def findings(results: dict) -> list:
    """Plain sentences computed from this run's numbers: which targets, and why."""
    cells = median_cells(results)
    t = results["targets"]
    out = []

    peers = [p for p in t["peers"] if not p.get("missing") and p["server"] == "splitserve"]
    if peers:
        met = [p for p in peers if p["throughput_met"] and p["p99_met"]]
        words = "; ".join(
            f"{fmt(p['throughput_ratio'], 1, 'x')} {label(p['vs'])}'s throughput with "
            f"{fmt(p['p99_ratio'], 2, 'x')} its p99"
            for p in peers
        )
        out.append(
            f"Peers: splitserve over v2 (unbatched, its default) answers {words}. "
            + ("Both peer targets (>= 5x throughput, <= 1/5 p99) are met."
               if len(met) == len(peers) == 2 else
               f"Peer targets met against {len(met)} of {len(peers)} peers.")
        )  # fmt: skip

    def cpu(name):
        c = cells.get(name)
        return (c.get("cpu") or {}).get("server_us_per_request") if c and not c["error"] else None

    mine = cpu("splitserve")
    peer_cpu = {n: cpu(n) for n in SERVERS if SERVERS[n].family in ("mlserver", "triton") and cpu(n)}
    if mine and peer_cpu:
        lo, hi = min(peer_cpu.values()), max(peer_cpu.values())
        nproc = results["machine"].get("nproc") or 2
        out.append(
            f"Why: per answered request the peers' processes used {fmt(lo, 0)}-{fmt(hi, 0)} us of CPU "
            f"(gRPC and tensor conversion in Python, and a hop to another process: MLServer's "
            f"inference worker, Triton's Python backend stub and PyTriton's proxy), splitserve "
            f"{fmt(mine, 0)} us. With {nproc} cores shared with the load generator that alone caps "
            f"a peer near {fmt(nproc / lo * 1e6, 0)} rps at best, and the requests queue behind it: "
            "the peers' p50 is mostly waiting."
        )

    for mine_name, other in (("splitserve", "splitserve-compute"),
                             ("splitserve-batched", "splitserve-compute-batched")):  # fmt: skip
        p = next((x for x in t["compute"] if x["server"] == mine_name and not x.get("missing")), None)
        if not p:
            continue
        a, b = cells[mine_name]["cpu"], cells[other]["cpu"]
        out.append(
            f"{label(mine_name)} reached {fmt(p['throughput_ratio'] * 100, 0, '%')} of "
            f"{label(other)}'s throughput ({'met' if p['throughput_met'] else 'missed'}: target "
            f">= {TARGET_COMPUTE_FRACTION:.0%}). The load generators differ: perf_analyzer used "
            f"{fmt(a['load_generator_cores'], 2)} cores ({fmt(a['load_generator_us_per_request'], 0)} us "
            f"per request), `splitserve bench` {fmt(b['load_generator_cores'], 2)} "
            f"({fmt(b['load_generator_us_per_request'], 0)} us), CPU the server could not use. "
            f"The server itself spent {fmt(a['server_us_per_request'], 0)} us of CPU per v2 request "
            f"and {fmt(b['server_us_per_request'], 0)} us per ComputeService request "
            f"({fmt(common.ratio(a['server_us_per_request'], b['server_us_per_request']), 2, 'x')})."
        )
        both_a = a["server_us_per_request"] + a["load_generator_us_per_request"]
        both_b = b["server_us_per_request"] + b["load_generator_us_per_request"]
        gap = both_a - both_b
        gen_gap = a["load_generator_us_per_request"] - b["load_generator_us_per_request"]
        if gap > 0:
            out.append(
                f"Server and load generator together: {fmt(both_a, 0)} us of CPU per v2 request, "
                f"{fmt(both_b, 0)} us per ComputeService request; ComputeService / v2 = "
                f"{fmt(both_b / both_a * 100, 0, '%')}, about the throughput ratio "
                f"({fmt(p['throughput_ratio'] * 100, 0, '%')}): on cores that both share, "
                f"throughput follows CPU per request, and {fmt(gen_gap, 0)} of the {fmt(gap, 0)} us "
                f"difference ({fmt(max(0.0, gen_gap) / gap * 100, 0, '%')}) is the load generator's."
            )

    aborted = [c for c in results["cells"] if not c["error"] and (c["load"] or {}).get("exit_code")]
    for c in aborted:
        if "compute counts" in (c["load"].get("abort") or ""):
            out.append(
                f"perf_analyzer aborted against {label(c['server'])} after printing its client-side "
                f"report (\"{c['load']['abort']}\"): splitserve's ModelStatistics counts "
                "compute_infer but leaves compute_input and compute_output at 0, and perf_analyzer "
                "requires the three counts to be equal. The numbers above are its client-side "
                "report, printed before the abort."
            )
            break
    return out


def write_section(markdown: Path, section: str) -> None:
    """Replaces the v2 section of the report, or appends it; the rest stays as it is."""
    text = markdown.read_text() if markdown.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end != -1:
        text = text[:start] + section.rstrip("\n") + text[end + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text if text.endswith("\n") else text + "\n")


# --- The run --------------------------------------------------------------------


def versions() -> dict:
    def pip_version(venv: Path, name: str):
        out = common.command_output([str(venv / "bin" / "python"), "-c",
                                     f"import importlib.metadata as m; print(m.version({name!r}))"])  # fmt: skip
        return out

    pa = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([str(PERF_ANALYZER), "--version"], env=perf_analyzer_env(),
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        pa = done.stdout + done.stderr
    m = re.search(r"Version ([\d.]+)", pa or "")
    return {
        "torch": pip_version(PEERS_VENV, "torch"),
        "mlserver": pip_version(PEERS_VENV, "mlserver"),
        "nvidia-pytriton": pip_version(PEERS_VENV, "nvidia-pytriton"),
        "tritonclient": pip_version(BENCH_VENV, "tritonclient"),
        "perf_analyzer": m.group(1) if m else None,
    }


def binary_stamp() -> str:
    """Size and modification time of the splitserve binary: a rebuild during the run shows."""
    st = BIN.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_setup(servers: list) -> None:
    if not BIN.is_file():
        sys.exit(f"{common.display_path(BIN)} is missing: run `make build`")
    if not (ROOT / MODEL_PATH).is_file():
        sys.exit(f"{MODEL_PATH} is missing: run `make fixtures`")
    needs = [PERF_ANALYZER] if any(SERVERS[n].protocol == "v2" for n in servers) else []
    needs += [PEERS_PY] if any(SERVERS[n].family != "splitserve" for n in servers) else []
    missing = [common.display_path(p) for p in needs if not p.exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing: run `bash {SETUP}`")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(cell: dict) -> str:
    if cell["error"]:
        return f"FAILED: {cell['error']}"
    load, cpu = cell["load"], cell["cpu"]
    return (
        f"{load['throughput_rps']:,.0f} rps, p50 {load['latency_ms'].get('p50', float('nan')):.2f} ms, "
        f"p99 {load['latency_ms'].get('p99', float('nan')):.2f} ms; cores: server "
        f"{cpu['server_cores']:.2f}, load generator {cpu['load_generator_cores']:.2f}; "
        f"server {cpu['server_us_per_request']:.0f} us CPU/request, other {cpu['other_cores']:.2f} cores"
        + (f" (perf_analyzer exit {load['exit_code']}: {load.get('abort')})" if load.get("exit_code") else "")
    )


def run_all(args) -> dict:
    check_setup(args.servers)
    out = Path(args.out)
    results = {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "command": args.command,
        "raw_results": common.display_path(out),
        "machine": common.machine_facts(),
        "versions": versions(),
        "settings": {
            "model": MODEL_PATH,
            "shape": list(SHAPE),
            "concurrency": CONCURRENCY,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "windows": WINDOWS,
            "repeat": args.repeat,
            "quiet_wait_s": args.quiet_wait,
            "retries": args.retries,
            "max_connections": MAX_CONNECTIONS,
            "max_batch_size": MAX_BATCH,
            "mlserver_max_batch_time_s": MLSERVER_BATCH_TIME_S,
            "servers": list(args.servers),
        },
        "cells": [],
        "disturbed": [],  # runs measured again: failed, or something else used the CPU meanwhile
    }
    stamp = binary_stamp()
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-v2-") as tmp:
        logdir = Path(tmp)
        data = input_data(logdir / "input.json")
        total = args.repeat * len(args.servers)
        # Round after round through every server: whatever else the machine does
        # meanwhile spreads over all of them instead of skewing one.
        for round_ in range(1, args.repeat + 1):
            for name in args.servers:
                for attempt in range(1 + args.retries):
                    time.sleep(SETTLE_S)
                    before = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
                    if before and not before["quiet"]:
                        progress(f"machine still busy ({before['busy_cores']:.2f} cores) after "
                                 f"{before['waited_s']:.0f} s: measuring anyway")  # fmt: skip
                    cell = measure(SERVERS[name], args, logdir, data)
                    cell["round"], cell["before"] = round_, before
                    other = (cell["cpu"] or {}).get("other_cores") or 0.0
                    disturbed = other >= OTHER_LOAD_NOTE and args.quiet_wait > 0
                    if not (cell["error"] or disturbed) or attempt == args.retries:
                        break
                    # A failed run, or something else ran beside it: on record, measure again.
                    results["disturbed"].append(cell)
                    why = "failed" if cell["error"] else f"other CPU use {other:.2f} cores"
                    progress(f"round {round_} {name}: {summary(cell)}; {why}, measuring again")
                results["cells"].append(cell)
                common.write_json(out, results)
                progress(f"[{len(results['cells'])}/{total}] round {round_} {name}: {summary(cell)}")
    results["binary_rebuilt_during_run"] = binary_stamp() != stamp
    if results["binary_rebuilt_during_run"]:
        progress(f"warning: {common.display_path(BIN)} was rebuilt during the run")
    results["targets"] = compute_targets(results)
    results["complete"] = True
    common.write_json(out, results)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=common.parse_seconds, default=None,
                   help=f"seconds measured per server (default {DEFAULT_DURATION_S:g}, "
                        f"{QUICK_DURATION_S:g} with --quick)")
    p.add_argument("--warmup", type=common.parse_seconds, default=WARMUP_S,
                   help=f"seconds of load before measuring (default {WARMUP_S:g})")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), help=f"any of {', '.join(SERVERS)} (default: all)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"rounds through every server; each reports its median run "
                        f"(default {DEFAULT_REPEAT}, 1 with --quick)")
    p.add_argument("--quiet-wait", type=common.parse_seconds, default=DEFAULT_QUIET_WAIT_S,
                   help="before each run, wait at most this long for the machine to be idle "
                        f"(default {DEFAULT_QUIET_WAIT_S:g}; 0: do not wait)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"runs measured again when other CPU use during them reached "
                        f"{OTHER_LOAD_NOTE:g} cores (default {DEFAULT_RETRIES})")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_DURATION_S:g} s per server, one round")
    p.add_argument("--out", default=None,
                   help=f"raw results JSON (default {DEFAULT_OUT}; with --quick, in the temp dir)")
    p.add_argument("--markdown", default=None,
                   help=f"report whose v2 section is (re)written (default {DEFAULT_MARKDOWN}; "
                        "with --quick, in the temp dir)")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="render the section from an earlier run's JSON; measure nothing")
    args = p.parse_args(argv)  # fmt: skip
    args.servers = common.words(args.servers)
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        p.error(f"--servers: unknown {', '.join(unknown)} (known: {', '.join(SERVERS)})")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if args.repeat is None:
        args.repeat = 1 if args.quick else DEFAULT_REPEAT
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    scratch = Path(tempfile.gettempdir())
    if args.out is None:
        args.out = str(scratch / "splitserve-bench-v2-quick.json") if args.quick else DEFAULT_OUT
    if args.markdown is None:
        args.markdown = str(scratch / "splitserve-bench-v2-quick.md") if args.quick else DEFAULT_MARKDOWN
    args.command = common.scrub(" ".join(
        [".venv/bin/python", "scripts/bench/v2.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])]
    ))  # fmt: skip
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        results["targets"] = compute_targets(results)
    else:
        atexit.register(common._kill_leftovers)
        signal.signal(signal.SIGTERM, common._exit_on_sigterm)
        results = run_all(args)
    write_section(Path(args.markdown), render_section(results))
    progress(f"wrote {common.display_path(args.markdown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

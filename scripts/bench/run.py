"""Side-by-side benchmark: splitserve against the Python servers it replaces.

For every model and client count it starts each server fresh on a free
loopback port, drives it with `splitserve bench` (closed loop), samples the
server's thread count every 50 ms, then stops it. It also measures two
in-process ceilings per model (Python's loop, scripts/bench/ceiling.py, and
libtorch alone, `splitserve diagnose`), writes the raw results as JSON and
renders them as a markdown report with the ratios computed from the same run.

Usage (from the repository root; `make bench` runs the first line):
  .venv/bin/python scripts/bench/run.py
  .venv/bin/python scripts/bench/run.py --quick        # smoke test, writes to the temp dir
  .venv/bin/python scripts/bench/run.py --models mlp512 --servers splitserve py-aio --duration 10
  .venv/bin/python scripts/bench/run.py --from-json docs/benchmarks.json   # re-render only
"""

import argparse
import atexit
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BIN = ROOT / "target" / "release" / "splitserve"

# Dynamic batching of the "splitserve batched" configuration. A timeout of 0 is
# opportunistic batching: a free worker takes every compatible request already
# queued and never waits for more, which suits closed-loop clients best (a wait
# only delays requests whose clients cannot send more until they are answered).
BATCH_TIMEOUT_US = 0

DEFAULT_DURATION_S = 5.0
DEFAULT_CONCURRENCY = (1, 8, 32, 64)
QUICK_DURATION_S = 1.0
QUICK_CONCURRENCY = (1, 8)
WARMUP_S = 1.0
MAX_CONNECTIONS = 4  # HTTP/2 connections the bench clients share
RATIO_CONCURRENCY = 32  # the client count the ratios compare at
THREAD_SAMPLE_INTERVAL_S = 0.05
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
SETTLE_S = 0.5  # pause between runs so one run's teardown doesn't load the next
DEFAULT_OUT = "docs/benchmarks.json"
DEFAULT_MARKDOWN = "docs/benchmarks.md"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Model:
    name: str
    path: str  # relative to the repository root
    shape: str  # e.g. 1x512
    # Rows per batched forward: small models gain from large batches (one GEMM
    # instead of many GEMVs); a compute-bound layer gains little and larger
    # batches only make latency uneven.
    max_batch: int
    # Its PyTorch 2 twin: the same module exported and compiled by AOTInductor
    # (scripts/make_pt2_fixtures.py --bench), served by the splitserve-pt2 servers.
    pt2_path: str = ""


@dataclass(frozen=True)
class Server:
    name: str
    family: str  # "splitserve" or "python"
    label: str
    description: str


MODELS = {
    m.name: m
    for m in (
        Model("mlp512", "tests/fixtures/generated/mlp512.pt", "1x512", max_batch=64,
              pt2_path="tests/fixtures/generated/pt2/mlp512.pt2"),
        Model("encoder", "tests/fixtures/generated/encoder.pt", "1x64x256", max_batch=8,
              pt2_path="tests/fixtures/generated/pt2/encoder.pt2"),
    )
}

SERVERS = {
    s.name: s
    for s in (
        Server(
            "splitserve",
            "splitserve",
            "splitserve unbatched",
            "`splitserve serve` with its default thread plan, no batching",
        ),
        Server(
            "splitserve-batched",
            "splitserve",
            "splitserve batched",
            "`splitserve serve --max-batch-size N "
            f"--batch-timeout-us {BATCH_TIMEOUT_US}` (N: 64 for the MLP, 8 for the encoder)",
        ),
        Server(
            "splitserve-pt2",
            "splitserve",
            "splitserve .pt2 unbatched",
            "`splitserve serve` on the model's AOTInductor package (.pt2), no batching",
        ),
        Server(
            "splitserve-pt2-batched",
            "splitserve",
            "splitserve .pt2 batched",
            "as splitserve batched, on the model's AOTInductor package (.pt2)",
        ),
        Server(
            "py-threadpool",
            "python",
            "Python threadpool",
            "grpc.server(ThreadPoolExecutor(max_workers=10)), PyTorch default threads",
        ),
        Server(
            "py-single",
            "python",
            "Python single",
            "max_workers=1, OMP/MKL_NUM_THREADS=1, torch.set_num_threads(1)",
        ),
        Server(
            "py-aio",
            "python",
            "Python aio",
            "grpc.aio.server(), forward via run_in_executor (splitlearn_comm's async server)",
        ),
    )
}


class RunError(Exception):
    """A server or a measurement that failed; recorded in the results, the run goes on."""


# --- Processes ------------------------------------------------------------------

_LIVE = set()  # server processes started and not yet reaped


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        stop_process(proc)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the runner dies without cleaning up."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def scrub(text: str) -> str:
    """Repository paths made relative, so recorded messages hold no machine's paths."""
    return text.replace(f"{ROOT}{os.sep}", "").replace(str(ROOT), ".")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM to the server's process group, SIGKILL if it lingers; its exit code."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    _LIVE.discard(proc)
    return proc.returncode


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def last_lines(text: str, lines: int) -> str:
    kept = [line.strip() for line in ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def tail(path: Path, lines: int = 3) -> str:
    try:
        return last_lines(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def read_threads(pid: int):
    """Threads of a live process from /proc/PID/status, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class ThreadSampler:
    """Samples a process's thread count on a background thread; keeps the maximum."""

    def __init__(self, pid: int, interval_s: float = THREAD_SAMPLE_INTERVAL_S):
        self.pid = pid
        self.interval_s = interval_s
        self.max = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            n = read_threads(self.pid)
            if n is not None:
                self.max = n if self.max is None else max(self.max, n)
                self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


# --- Servers --------------------------------------------------------------------


def server_argv(server: Server, model: Model, port: int) -> list:
    if server.family == "python":
        mode = server.name.removeprefix("py-")
        return [
            sys.executable,
            str(HERE / "python_server.py"),
            "--port", str(port),
            "--model", model.path,
            "--mode", mode,
            "--warmup-shape", model.shape,
        ]  # fmt: skip
    path = model.pt2_path if server.name.startswith("splitserve-pt2") else model.path
    argv = [
        str(BIN), "serve",
        "--grpc-addr", f"127.0.0.1:{port}",
        "--metrics-addr", "127.0.0.1:0",
        "--http-addr", "127.0.0.1:0",
        "--model", f"m={path}",
        "--warmup-shape", f"m={model.shape}",
    ]  # fmt: skip
    if server.name in ("splitserve-batched", "splitserve-pt2-batched"):
        argv += ["--max-batch-size", str(model.max_batch), "--batch-timeout-us", str(BATCH_TIMEOUT_US)]
    return argv


def is_ready(server: Server, addr: str, stdout_path: Path) -> bool:
    if server.family == "python":
        return "ready" in stdout_path.read_text(errors="replace").split()
    probe = [str(BIN), "probe", "--addr", addr, "--timeout", "1s"]
    return subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0


def wait_ready(server: Server, proc: subprocess.Popen, addr: str, logs) -> None:
    stdout_path, stderr_path = logs
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunError(f"{server.name} exited {proc.returncode} at start: {tail(stderr_path)}")
        if is_ready(server, addr, stdout_path):
            return
        time.sleep(0.1)
    raise RunError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s: {tail(stderr_path)}")


@contextlib.contextmanager
def running_server(server: Server, model: Model, logdir: Path):
    """Starts the server on a free loopback port, yields (proc, addr), always stops it."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    stem = logdir / f"{model.name}-{server.name}-{port}"
    logs = (stem.with_suffix(".out"), stem.with_suffix(".err"))
    with open(logs[0], "wb") as out, open(logs[1], "wb") as err:
        proc = subprocess.Popen(
            server_argv(server, model, port),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            process_group=0,  # its own process group: stop_process reaches all of it
            preexec_fn=_die_with_parent,
        )
    _LIVE.add(proc)
    try:
        wait_ready(server, proc, addr, logs)
        yield proc, addr
    finally:
        stop_process(proc)


# --- Measurements ---------------------------------------------------------------


def as_duration(seconds: float) -> str:
    return f"{int(round(seconds * 1000))}ms"


def run_json(argv: list, timeout_s: float, what: str):
    """Runs a command that prints JSON on stdout; its parsed output, or RunError."""
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise RunError(f"{what} did not finish in {timeout_s:.0f} s") from None
    except OSError as e:
        raise RunError(f"{what} could not start: {e}") from None
    if done.returncode != 0:
        reason = last_lines(done.stderr, 1) or last_lines(done.stdout, 1)
        raise RunError(f"{what} exited {done.returncode}: {reason}")
    text = done.stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(text.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise RunError(f"{what} printed no JSON: {text[:200]!r}") from None


def run_bench(addr: str, model: Model, concurrency: int, duration_s: float) -> dict:
    argv = [
        str(BIN), "bench",
        "--addr", addr,
        "--concurrency", str(concurrency),
        "--connections", str(min(MAX_CONNECTIONS, concurrency)),
        "--duration", as_duration(duration_s),
        "--warmup", as_duration(WARMUP_S),
        "--shape", model.shape,
        "--json",
    ]  # fmt: skip
    return run_json(argv, WARMUP_S + duration_s + 120, "splitserve bench")


def measure_server(server: Server, model: Model, concurrency: int, duration_s: float, logdir) -> dict:
    cell = {
        "server": server.name,
        "concurrency": concurrency,
        "bench": None,
        "threads_at_ready": None,
        "max_threads": None,
        "thread_samples": 0,
        "exit_code": None,
        "error": None,
    }
    try:
        with running_server(server, model, logdir) as (proc, addr):
            cell["threads_at_ready"] = read_threads(proc.pid)
            with ThreadSampler(proc.pid) as sampler:
                cell["bench"] = run_bench(addr, model, concurrency, duration_s)
            cell["max_threads"] = sampler.max
            cell["thread_samples"] = sampler.samples
        cell["exit_code"] = proc.returncode
    except RunError as e:
        cell["error"] = scrub(str(e))
    return cell


def python_ceiling(model: Model, duration_s: float) -> dict:
    argv = [
        sys.executable, str(HERE / "ceiling.py"),
        "--model", model.path,
        "--shape", model.shape,
        "--duration", str(duration_s),
        "--warmup", str(WARMUP_S),
    ]  # fmt: skip
    return run_json(argv, WARMUP_S + duration_s + 120, "ceiling.py")


def rust_ceiling(model: Model, duration_s: float) -> dict:
    """`splitserve diagnose`'s libtorch-alone rows and the fastest of them."""
    argv = [
        str(BIN), "diagnose",
        "--model", model.path,
        "--shape", model.shape,
        "--duration", as_duration(duration_s),
        "--json",
    ]  # fmt: skip
    report = run_json(argv, 120 + 30 * duration_s, "splitserve diagnose")
    rows = report.get("libtorch_alone") if isinstance(report, dict) else None
    rows = [r for r in rows or [] if isinstance(r, dict) and r.get("throughput_rps") is not None]
    if not rows:
        raise RunError("splitserve diagnose reported no libtorch_alone rows")
    best = max(rows, key=lambda r: r["throughput_rps"])
    return {"throughput_rps": best["throughput_rps"], "best": best, "rows": rows}


def measure_ceilings(model: Model, duration_s: float) -> dict:
    ceilings = {}
    for kind, fn in (("python", python_ceiling), ("rust", rust_ceiling)):
        try:
            ceilings[kind], ceilings[f"{kind}_error"] = fn(model, duration_s), None
        except RunError as e:
            ceilings[kind], ceilings[f"{kind}_error"] = None, scrub(str(e))
    return ceilings


# --- Facts ----------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cgroup_cpu_max():
    with contextlib.suppress(OSError):
        return Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    return None


def package_version(name: str):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def command_output(argv: list):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def machine_facts() -> dict:
    status = command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cgroup_cpu_max": cgroup_cpu_max(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "grpcio": package_version("grpcio"),
        "numpy": package_version("numpy"),
        "splitserve": command_output([str(BIN), "--version"]),
        "git_commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": None if status is None else bool(status),
    }


# --- Ratios ---------------------------------------------------------------------


def cells_by_key(model_result: dict) -> dict:
    return {(c["server"], c["concurrency"]): c for c in model_result["runs"]}


def bench_of(cells: dict, server: str, concurrency: int):
    cell = cells.get((server, concurrency))
    return cell["bench"] if cell and cell["bench"] and cell["bench"].get("ok") else None


def ratio(a, b):
    return a / b if a is not None and b else None


def compare(cells: dict, server: str, other: str, at: int):
    mine, theirs = bench_of(cells, server, at), bench_of(cells, other, at) if other else None
    if not mine or not theirs:
        return None
    return {
        "server": server,
        "vs": other,
        "throughput_rps": mine["throughput_rps"],
        "vs_throughput_rps": theirs["throughput_rps"],
        "throughput_ratio": ratio(mine["throughput_rps"], theirs["throughput_rps"]),
        "p99_ms": mine["latency_ms"]["p99"],
        "vs_p99_ms": theirs["latency_ms"]["p99"],
        "p99_ratio": ratio(mine["latency_ms"]["p99"], theirs["latency_ms"]["p99"]),
    }


def best_python(cells: dict, at: int):
    candidates = [
        (b["throughput_rps"], name)
        for name, s in SERVERS.items()
        if s.family == "python" and (b := bench_of(cells, name, at))
    ]
    return max(candidates)[1] if candidates else None


def ceiling_ratio(cells: dict, ceilings: dict, at: int):
    mine = bench_of(cells, "splitserve", at)
    kind = "rust" if ceilings.get("rust") else "python" if ceilings.get("python") else None
    if not mine or not kind:
        return None
    ceiling = ceilings[kind]["throughput_rps"]
    return {
        "ceiling": kind,
        "ceiling_rps": ceiling,
        "throughput_rps": mine["throughput_rps"],
        "fraction": ratio(mine["throughput_rps"], ceiling),
    }


def thread_flatness(model_result: dict, low: int, high: int) -> dict:
    cells = cells_by_key(model_result)
    flat = {}
    for name in model_result["servers"]:
        lo, hi = cells.get((name, low)), cells.get((name, high))
        flat[name] = {
            "low": lo["max_threads"] if lo else None,
            "high": hi["max_threads"] if hi else None,
        }
    return flat


def pt2_ratios(cells: dict, concurrency: list) -> list:
    """Each .pt2 server against its TorchScript counterpart, at every client count."""
    out = []
    for n in concurrency:
        for pt2, ts in (("splitserve-pt2", "splitserve"), ("splitserve-pt2-batched", "splitserve-batched")):
            c = compare(cells, pt2, ts, n)
            if c:
                out.append({**c, "concurrency": n})
    return out


def compute_ratios(model_result: dict, concurrency: list) -> dict:
    cells = cells_by_key(model_result)
    at = RATIO_CONCURRENCY if RATIO_CONCURRENCY in concurrency else max(concurrency)
    py = best_python(cells, at)
    low, high = min(concurrency), max(concurrency)
    return {
        "at_concurrency": at,
        "best_python": py,
        "unbatched_vs_python": compare(cells, "splitserve", py, at),
        "batched_vs_python": compare(cells, "splitserve-batched", py, at),
        "unbatched_vs_ceiling": ceiling_ratio(cells, model_result["ceilings"], at),
        # The .pt2 twin against the TorchScript model, at every client count.
        "pt2_vs_torchscript": pt2_ratios(cells, concurrency),
        "threads": {"low_concurrency": low, "high_concurrency": high,
                    "servers": thread_flatness(model_result, low, high)},
    }  # fmt: skip


# --- Markdown -------------------------------------------------------------------


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def display_path(path) -> str:
    """Relative to the repository when inside it, else as given."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def clients(n: int) -> str:
    return f"{n} client" + ("" if n == 1 else "s")


def errors_text(cell: dict) -> str:
    if cell["error"]:
        return f"failed: {cell['error']}".replace("|", "/")
    errors = cell["bench"].get("errors") or {}
    total = sum(errors.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")"


def model_table(model_result: dict) -> list:
    lines = [
        "| Server | Clients | Throughput (rps) | p50 (ms) | p99 (ms) | Max threads | Errors |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for cell in model_result["runs"]:
        b = cell["bench"] or {}
        lat = b.get("latency_ms") or {}
        lines.append(
            f"| {SERVERS[cell['server']].label} | {cell['concurrency']} "
            f"| {fmt(b.get('throughput_rps'), 0)} | {fmt(lat.get('p50'), 2)} "
            f"| {fmt(lat.get('p99'), 2)} | {fmt(cell['max_threads'])} | {errors_text(cell)} |"
        )
    return lines


def ceiling_lines(ceilings: dict) -> list:
    py, rust = ceilings.get("python"), ceilings.get("rust")
    lines = []
    if py:
        lines.append(
            f"- Python in-process loop (`scripts/bench/ceiling.py`, {py['threads']} threads): "
            f"{fmt(py['throughput_rps'], 0)} forwards/s, p50 {fmt(py['p50_ms'], 3)} ms, "
            f"p99 {fmt(py['p99_ms'], 3)} ms"
        )
    else:
        lines.append(f"- Python in-process loop: not measured ({ceilings.get('python_error')})")
    if rust:
        best = rust["best"]
        lines.append(
            f"- libtorch alone (`splitserve diagnose`, best of {len(rust['rows'])} plans: "
            f"{best.get('workers')}x{best.get('intra_op_threads')} workers x intra-op threads"
            f"{', oversubscribed' if best.get('oversubscribed') else ''}): "
            f"{fmt(rust['throughput_rps'], 0)} forwards/s, p50 {fmt(best.get('p50_ms'), 3)} ms, "
            f"p99 {fmt(best.get('p99_ms'), 3)} ms"
        )
    else:
        lines.append(f"- libtorch alone: not measured ({ceilings.get('rust_error')})")
    return lines


def label(name) -> str:
    return SERVERS[name].label if name in SERVERS else "n/a"


def comparison_row(model: str, what: str, c) -> str:
    if not c:
        return f"| {model} | {what} | n/a | n/a | n/a | n/a | n/a | n/a |"
    return (
        f"| {model} | {what} | {fmt(c['throughput_rps'], 0)} | {fmt(c['vs_throughput_rps'], 0)} "
        f"| **{fmt(c['throughput_ratio'], 2, 'x')}** | {fmt(c['p99_ms'], 2)} "
        f"| {fmt(c['vs_p99_ms'], 2)} | **{fmt(c['p99_ratio'], 2, 'x')}** |"
    )


def ratio_lines(results: dict) -> list:
    lines = ["## Ratios", ""]
    ats = sorted({m["ratios"]["at_concurrency"] for m in results["models"].values()})
    lines.append(
        f"Computed from the runs above at {', '.join(map(clients, ats))}. Throughput ratio: "
        "splitserve / the other (above 1 = splitserve answers more). p99 ratio: splitserve / "
        "the other (below 1 = splitserve's tail is shorter). \"Best Python\" is the Python "
        "configuration with the highest throughput at that client count."
    )
    lines += [
        "",
        "| Model | Comparison | splitserve rps | other rps | Throughput ratio "
        "| splitserve p99 (ms) | other p99 (ms) | p99 ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        r = m["ratios"]
        py = label(r["best_python"])
        lines.append(comparison_row(name, f"unbatched vs best Python ({py})", r["unbatched_vs_python"]))
        lines.append(comparison_row(name, f"batched vs best Python ({py})", r["batched_vs_python"]))
        for c in r.get("pt2_vs_torchscript", []):
            mode = "batched" if c["server"].endswith("batched") else "unbatched"
            lines.append(comparison_row(name, f".pt2 vs TorchScript, {mode}, {clients(c['concurrency'])}", c))
    lines += ["", "| Model | splitserve unbatched rps | Ceiling | Ceiling rps | Fraction of ceiling |",
              "|---|---:|---|---:|---:|"]  # fmt: skip
    for name, m in results["models"].items():
        c = m["ratios"]["unbatched_vs_ceiling"]
        if c:
            kind = "libtorch alone" if c["ceiling"] == "rust" else "Python in-process loop"
            lines.append(
                f"| {name} | {fmt(c['throughput_rps'], 0)} | {kind} | {fmt(c['ceiling_rps'], 0)} "
                f"| **{fmt(c['fraction'] * 100 if c['fraction'] is not None else None, 0, '%')}** |"
            )
        else:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a |")
    lines += thread_flatness_lines(results)
    return lines


def thread_flatness_lines(results: dict) -> list:
    lines = ["", "Server threads (the most sampled during the run) as clients grow:", ""]
    first = next(iter(results["models"].values()), None)
    if not first:
        return lines
    t = first["ratios"]["threads"]
    lines += [
        f"| Model | Server | Threads at {clients(t['low_concurrency'])} "
        f"| Threads at {clients(t['high_concurrency'])} |",
        "|---|---|---:|---:|",
    ]
    for name, m in results["models"].items():
        for server, th in m["ratios"]["threads"]["servers"].items():
            lines.append(f"| {name} | {label(server)} | {fmt(th['low'])} | {fmt(th['high'])} |")
    return lines


def machine_lines(facts: dict) -> list:
    dirty = " (with uncommitted changes)" if facts.get("git_dirty") else ""
    cgroup = facts.get("cgroup_cpu_max")
    return [
        "## Machine",
        "",
        f"- CPU: {facts['cpu_model']}; nproc {facts['nproc']} (os.cpu_count {facts['cpu_count']})"
        + (f"; cgroup cpu.max `{cgroup}`" if cgroup else ""),
        f"- Linux {facts['kernel']}, Python {facts['python']}, torch {facts['torch']}, "
        f"grpcio {facts['grpcio']}, numpy {facts['numpy']}",
        f"- {facts['splitserve'] or 'splitserve (version unknown)'}, "
        f"commit {facts['git_commit'] or 'unknown'}{dirty}",
        f"- Date: {facts['date']}",
    ]


def method_lines(results: dict) -> list:
    s = results["settings"]
    lines = [
        "## How it was measured",
        "",
        f"- Load: `splitserve bench`, closed loop: N clients, each sending its next request when "
        f"the last returns, over min(N, {s['max_connections']}) HTTP/2 connections; "
        f"{fmt(s['warmup_s'])} s warm-up, then {fmt(s['duration_s'])} s measured. The load "
        "generator runs on the same machine as the server and competes with it for the CPU.",
        "- Every cell starts its server fresh on a loopback port and stops it afterwards. "
        f"Max threads: the highest `Threads:` of /proc/PID/status, sampled every "
        f"{s['thread_sample_interval_ms']} ms during warm-up and measurement.",
        "- Every server runs the same TorchScript file on the CPU and answers the same bytes.",
        "",
        "Servers:",
        "",
    ]
    lines += [f"- {SERVERS[n].label}: {SERVERS[n].description}" for n in s["servers"]]
    return lines


def render_markdown(results: dict) -> str:
    lines = [
        "# splitserve vs the Python servers it replaces",
        "",
        "Generated by `scripts/bench/run.py`; do not edit by hand. Reproduce with `make bench` "
        "(which runs `.venv/bin/python scripts/bench/run.py`). This report came from:",
        "",
        f"    {results['command']}",
        "",
        f"Raw results: `{results['raw_results']}`.",
        "",
    ]
    lines += machine_lines(results["machine"]) + [""]
    lines += method_lines(results) + [""]
    for name, m in results["models"].items():
        lines += [f"## {name} (input {m['shape']}, `{m['path']}`)", ""]
        lines += model_table(m) + ["", "In-process ceilings (no RPC, one row per forward):", ""]
        lines += ceiling_lines(m["ceilings"]) + [""]
    lines += ratio_lines(results)
    return "\n".join(lines) + "\n"


# --- The run --------------------------------------------------------------------


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cell_summary(cell: dict) -> str:
    if cell["error"]:
        return f"FAILED: {cell['error']}"
    b = cell["bench"]
    return (
        f"{b['throughput_rps']:,.0f} rps, p50 {b['latency_ms']['p50']:.2f} ms, "
        f"p99 {b['latency_ms']['p99']:.2f} ms, max threads {cell['max_threads']}"
        + (f", errors {b['errors']}" if b.get("errors") else "")
    )


def run_model(model: Model, args, results: dict, out: Path, logdir: Path) -> None:
    m = results["models"][model.name] = {
        "path": model.path,
        "shape": model.shape,
        "servers": list(args.servers),
        "ceilings": {},
        "runs": [],
    }
    progress(f"{model.name}: in-process ceilings")
    m["ceilings"] = measure_ceilings(model, args.duration)
    total = len(args.servers) * len(args.concurrency)
    for server in (SERVERS[n] for n in args.servers):
        for concurrency in args.concurrency:
            time.sleep(SETTLE_S)
            cell = measure_server(server, model, concurrency, args.duration, logdir)
            m["runs"].append(cell)
            write_json(out, results)
            progress(f"[{len(m['runs'])}/{total}] {model.name} {server.name} "
                     f"c={concurrency}: {cell_summary(cell)}")  # fmt: skip
    m["ratios"] = compute_ratios(m, args.concurrency)


def check_inputs(models: list, servers: list) -> None:
    if not BIN.is_file():
        sys.exit(f"{display_path(BIN)} is missing: run `make build`")
    pt2 = any(s.startswith("splitserve-pt2") for s in servers)
    for model in models:
        if not (ROOT / model.path).is_file():
            sys.exit(f"{model.path} is missing: run `make fixtures`")
        if pt2 and not (ROOT / model.pt2_path).is_file():
            sys.exit(f"{model.pt2_path} is missing: run `make bench-fixtures`")


def run_all(args) -> dict:
    models = [MODELS[n] for n in args.models]
    check_inputs(models, args.servers)
    out = Path(args.out)
    results = {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "command": args.command,
        "raw_results": display_path(out),
        "machine": machine_facts(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": WARMUP_S,
            "concurrency": list(args.concurrency),
            "max_connections": MAX_CONNECTIONS,
            "ratio_concurrency": RATIO_CONCURRENCY,
            "thread_sample_interval_ms": int(THREAD_SAMPLE_INTERVAL_S * 1000),
            "batch": {"max_batch_size": {m.name: m.max_batch for m in MODELS.values()}, "batch_timeout_us": BATCH_TIMEOUT_US},
            "servers": list(args.servers),
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as logdir:
        for model in models:
            run_model(model, args, results, out, Path(logdir))
    results["complete"] = True
    write_json(out, results)
    return results


def words(values) -> list:
    """Accepts both `--x a b` and `--x a,b`."""
    return [w for v in values for w in v.split(",") if w]


def parse_seconds(text: str) -> float:
    return float(text[:-1] if text.endswith("s") else text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=parse_seconds, default=None,
                   help=f"seconds measured per run (default {DEFAULT_DURATION_S:g}, "
                        f"{QUICK_DURATION_S:g} with --quick)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {', '.join(MODELS)} (default: all)")
    p.add_argument("--concurrency", nargs="+", default=None,
                   help=f"client counts (default {' '.join(map(str, DEFAULT_CONCURRENCY))}, "
                        f"{' '.join(map(str, QUICK_CONCURRENCY))} with --quick)")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), help=f"any of {', '.join(SERVERS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 s runs at 1 and 8 clients")
    p.add_argument("--out", default=None,
                   help=f"raw results JSON (default {DEFAULT_OUT}; with --quick, in the temp dir)")
    p.add_argument("--markdown", default=None,
                   help=f"rendered report (default {DEFAULT_MARKDOWN}; with --quick, in the temp dir)")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="render --markdown from an earlier run's JSON; measure nothing")
    args = p.parse_args(argv)  # fmt: skip
    args.models = words(args.models)
    args.servers = words(args.servers)
    for value, known, flag in ((args.models, MODELS, "--models"), (args.servers, SERVERS, "--servers")):
        unknown = [v for v in value if v not in known]
        if unknown:
            p.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.concurrency is None:
        args.concurrency = list(QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY)
    else:
        try:
            args.concurrency = sorted({int(c) for c in words(args.concurrency)})
        except ValueError:
            p.error("--concurrency takes whole numbers")
        if min(args.concurrency) < 1:
            p.error("--concurrency must be at least 1")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    # A smoke test must never overwrite the published report.
    scratch = Path(tempfile.gettempdir())
    if args.out is None:
        args.out = str(scratch / "splitserve-bench-quick.json") if args.quick else DEFAULT_OUT
    if args.markdown is None:
        args.markdown = str(scratch / "splitserve-bench-quick.md") if args.quick else DEFAULT_MARKDOWN
    args.command = scrub(" ".join(
        [".venv/bin/python", "scripts/bench/run.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])]
    ))
    return args


# Sections that other scripts write into the same report (scripts/bench/v2.py's),
# each between its own markers: kept, in order, after this script's part.
KEPT_SECTION = re.compile(r"<!-- begin: (\S+) .*?-->.*?<!-- end: \1 -->\n?", re.S)


def kept_sections(path: Path) -> str:
    with contextlib.suppress(OSError):
        return "".join(m.group(0) for m in KEPT_SECTION.finditer(path.read_text()))
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for m in results["models"].values():  # a run cut short has no ratios yet
            m.setdefault("ratios", compute_ratios(m, results["settings"]["concurrency"]))
    else:
        atexit.register(_kill_leftovers)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        results = run_all(args)
    markdown = Path(args.markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    kept = kept_sections(markdown)
    markdown.write_text(render_markdown(results) + ("\n" + kept if kept else ""))
    written = [markdown] if args.from_json else [Path(args.out), markdown]
    progress("wrote " + " and ".join(display_path(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

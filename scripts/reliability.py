"""Reliability figures for splitserve, measured against the real binary.

Five scenarios, each on its own `splitserve serve` started fresh on free
loopback ports and stopped afterwards:

  overload   10x the clients that saturate the server, with a small queue and
             short deadlines: the share shed with RESOURCE_EXHAUSTED, latency
             of the accepted requests, RSS, and liveness during the run
  soak       1,000,000 requests on the default MLP: RSS sampled through the
             run, its growth from 10% to 100% of the requests
  sigterm    SIGTERM with requests queued and in flight on a slow model: every
             one answered, exit code 0
  sigkill    SIGKILL in the middle of split training with durable checkpoints:
             the resumed run's parameters against an uninterrupted run's
  rotation   --max-connection-age under load on one long-lived channel:
             failed requests (none expected) and connections rotated

Load comes from `splitserve bench` (closed loop) and grpcio clients with stubs
compiled from the project's proto; RSS from /proc/PID/status, counters from the
admin /metrics endpoint. Writes docs/reliability.md and docs/reliability.json.

Usage (from the repository root; `make reliability` runs the first line):
  .venv/bin/python scripts/reliability.py
  .venv/bin/python scripts/reliability.py --quick              # smoke run, writes to a temp dir
  .venv/bin/python scripts/reliability.py --quick --only sigterm sigkill
  .venv/bin/python scripts/reliability.py --from-json docs/reliability.json   # re-render only

A full run (every scenario, not --quick) in which every scenario ran writes to
docs/, failed checks included and marked; a smoke run, a subset, or a run in
which a scenario could not run (no server, a hung client) writes to a temp dir
instead (or --out-dir). Exits 1 when a check fails or a scenario cannot run.
"""

import argparse
import atexit
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "splitserve"
FIXTURES = ROOT / "tests" / "fixtures" / "generated"
DEFAULT_JSON = ROOT / "docs" / "reliability.json"
DEFAULT_MARKDOWN = ROOT / "docs" / "reliability.md"
SCHEMA_VERSION = 1
SCENARIOS = ("overload", "soak", "sigterm", "sigkill", "rotation")

READY_TIMEOUT_S = 120.0
MIB = 1024 * 1024

# Every server runs the models on the CPU, so that figures from machines with
# and without a GPU compare.
COMMON_FLAGS = ["--device", "cpu"]


@dataclass(frozen=True)
class Config:
    capacity_clients: int = 32
    capacity_s: float = 5.0
    overload_factor: int = 10
    overload_queue: int = 64
    overload_deadline: str = "100ms"
    overload_connections: int = 8
    overload_s: float = 20.0
    soak_requests: int = 1_000_000
    soak_clients: int = 32
    soak_chunk_s: float = 15.0
    soak_growth_limit: float = 0.10  # fail when RSS grows more than this from 10% to 100%
    sigterm_model_ms: int = 300
    sigterm_workers: int = 2
    sigterm_requests: int = 20
    train_steps: int = 30
    train_kill_after: int = 17  # complete steps before the step that SIGKILL interrupts
    train_checkpoint_every: int = 3
    train_tolerance: float = 1e-6
    rotation_age: str = "2s"
    rotation_grace: str = "10s"
    rotation_threads: int = 8
    rotation_s: float = 20.0


QUICK = Config(
    capacity_s=2.0,
    overload_s=4.0,
    soak_requests=100_000,
    soak_chunk_s=5.0,
    sigterm_requests=8,
    train_steps=12,
    train_kill_after=7,
    rotation_s=6.0,
)


class ScenarioError(Exception):
    """A scenario could not run (the server did not start, a client hung, ...)."""


# --- Stubs ----------------------------------------------------------------------

sys.path.insert(0, str(ROOT / "examples"))
import split_training  # noqa: E402  (the example's stubs and tensor codec)

to_wire, from_wire = split_training.to_wire, split_training.from_wire
_stubs = None


def stubs():
    """(pb2, pb2_grpc) for splitlearn.comm.ComputeService, compiled once."""
    global _stubs
    if _stubs is None:
        _stubs = split_training.load_stubs()
    return _stubs


# --- Servers --------------------------------------------------------------------

_live_servers = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrub(text: str, extra: dict | None = None) -> str:
    """No machine-specific paths in what the report keeps."""
    for path, placeholder in (extra or {}).items():
        text = text.replace(str(path), placeholder)
    text = text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
    return text.replace(tempfile.gettempdir().rstrip("/") + "/", "$TMPDIR/")


class Server:
    """`splitserve serve` on free loopback ports, its output in a log file."""

    def __init__(self, name: str, flags: list, workdir: Path, placeholders: dict | None = None,
                 env: dict | None = None):
        if not BIN.is_file():
            raise ScenarioError(f"{BIN.relative_to(ROOT)} is missing: run `make build`")
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.flags = list(flags)
        self.placeholders = dict(placeholders or {})
        self.env = dict(env or {})
        argv = [
            str(BIN), "serve",
            "--grpc-addr", self.addr,
            "--http-addr", "127.0.0.1:0",
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
            *COMMON_FLAGS, *self.flags,
        ]  # fmt: skip
        self.log_path = workdir / f"{name}.{self.port}.log"
        self.log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        _live_servers.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self) -> str:
        """The command line as the report shows it: ports and temp dirs as placeholders."""
        argv = [
            *(f"{k}={v}" for k, v in self.env.items()),
            "target/release/splitserve", "serve",
            "--grpc-addr", "127.0.0.1:PORT",
            "--http-addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:METRICS_PORT",
            *COMMON_FLAGS, *self.flags,
        ]  # fmt: skip
        return scrub(shlex.join(argv), self.placeholders)

    def log_lines(self) -> list:
        with contextlib.suppress(OSError):
            if not self.log.closed:
                self.log.flush()
            return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in self.log_path.read_text(errors="replace").splitlines()]
        return []

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            if not self.log.closed:
                self.log.flush()
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            text = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text]
            return scrub("\n".join("    " + line for line in text), self.placeholders)
        return "    (no log)"

    def fail(self, what: str) -> ScenarioError:
        return ScenarioError(f"{self.name}: {what}\n  server log (last lines):\n{self.log_tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Waits for grpc.health.v1 to answer SERVING; returns seconds since the start."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise self.fail(f"exited with code {self.proc.returncode} before it was ready")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - self.started
                time.sleep(0.05)
        raise self.fail(f"not SERVING within {timeout:.0f} s")

    def rss(self) -> dict:
        """VmRSS and VmHWM (the peak so far) in bytes."""
        out = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def metrics(self) -> "Metrics":
        try:
            with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
                return Metrics(r.read().decode())
        except OSError as e:
            raise self.fail(f"/metrics did not answer: {e}") from e

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"still running {timeout:.0f} s after the signal") from None

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        self.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self in _live_servers:
            _live_servers.remove(self)


@atexit.register
def _kill_leftovers() -> None:
    for s in list(_live_servers):
        with contextlib.suppress(Exception):
            s.close()


class Metrics:
    """The Prometheus text of /metrics, summed over matching label sets."""

    LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
    LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

    def __init__(self, text: str):
        self.samples = []
        for line in text.splitlines():
            m = self.LINE.match(line)
            if m and not line.startswith("#"):
                labels = dict(self.LABEL.findall(m.group(3) or ""))
                with contextlib.suppress(ValueError):
                    self.samples.append((m.group(1), labels, float(m.group(4))))

    def get(self, family: str, **labels) -> float:
        return sum(
            v for name, ls, v in self.samples
            if name == family and all(ls.get(k) == str(want) for k, want in labels.items())
        )  # fmt: skip

    def by(self, family: str, key: str, **labels) -> dict:
        out = {}
        for name, ls, v in self.samples:
            if name == family and all(ls.get(k) == str(want) for k, want in labels.items()):
                out[ls.get(key, "")] = out.get(ls.get(key, ""), 0.0) + v
        return out


def delta(after: dict, before: dict) -> dict:
    return {k: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0)}


class Sampler(threading.Thread):
    """Samples the server's RSS (and optionally a counter) every `interval` s."""

    def __init__(self, server: Server, interval: float, counter=None):
        super().__init__(daemon=True)
        self.server, self.interval, self.counter = server, interval, counter
        self.samples = []  # (seconds, rss bytes, counter or None)
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        rss = self.server.rss().get("VmRSS")
        if rss is None:
            return
        count = None
        if self.counter is not None:
            with contextlib.suppress(ScenarioError):
                count = self.counter(self.server.metrics())
        self.samples.append((round(time.monotonic() - self.t0, 3), rss, count))

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)

    def stop(self) -> list:
        self.stopped.set()
        self.join(10)
        self.sample()
        return self.samples


class LivenessProber(threading.Thread):
    """grpc.health.v1 Check(service="liveness") every `interval` s on its own channel."""

    def __init__(self, addr: str, interval: float = 0.2, timeout: float = 1.0):
        super().__init__(daemon=True)
        self.addr, self.interval, self.timeout = addr, interval, timeout
        self.results = []  # (status name or error code, seconds)
        self.stopped = threading.Event()

    def run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stopped.is_set():
                t = time.perf_counter()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=self.timeout)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as e:
                    status = e.code().name
                self.results.append((status, time.perf_counter() - t))
                self.stopped.wait(self.interval)

    def stop(self) -> dict:
        self.stopped.set()
        self.join(10)
        serving = [s for s, _ in self.results if s == "SERVING"]
        latencies = sorted(t for _, t in self.results)
        return {
            "probes": len(self.results),
            "serving": len(serving),
            "other": sorted({s for s, _ in self.results if s != "SERVING"}),
            "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
            "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        }


def percentile(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p / 100 * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


# --- splitserve bench -----------------------------------------------------------


def bench(server: Server, *, clients: int, connections: int, duration_s: float,
          warmup_s: float = 1.0, timeout: str = "30s", model_id: str = "", shape: str = "1x512") -> dict:
    argv = [
        str(BIN), "bench",
        "--addr", server.addr,
        "--concurrency", str(clients),
        "--connections", str(connections),
        "--duration", f"{int(round(duration_s * 1000))}ms",
        "--warmup", f"{int(round(warmup_s * 1000))}ms",
        "--timeout", timeout,
        "--shape", shape,
        "--json",
    ]  # fmt: skip
    if model_id:
        argv += ["--model-id", model_id]
    if bench_has_max_error_rate():
        argv += ["--max-error-rate", "1"]  # failures are counted and judged here
    limit = warmup_s + duration_s + 60
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise server.fail(f"splitserve bench did not finish within {limit:.0f} s") from None
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise server.fail(f"splitserve bench exited {done.returncode} without a JSON report: "
                          f"{(done.stderr or done.stdout).strip()[-500:]}") from None
    if not isinstance(report, dict) or "ok" not in report:
        raise server.fail(f"splitserve bench printed an unexpected report: {done.stdout[-300:]!r}")
    report["command"] = scrub(shlex.join(["target/release/splitserve", *argv[1:]]).replace(server.addr, "127.0.0.1:PORT"))
    return report


_bench_flags = None


def bench_has_max_error_rate() -> bool:
    """Newer `splitserve bench` exits 1 when requests fail unless --max-error-rate allows it."""
    global _bench_flags
    if _bench_flags is None:
        _bench_flags = command_output([str(BIN), "bench", "--help"]) or ""
    return "--max-error-rate" in _bench_flags


# --- Checks ---------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.items = []

    def add(self, ok: bool, what: str) -> bool:
        self.items.append({"ok": bool(ok), "what": what})
        return bool(ok)

    def passed(self) -> bool:
        return all(c["ok"] for c in self.items)


def mib(n) -> float | None:
    return None if n is None else round(n / MIB, 1)


def histogram_mean_ms(before: Metrics, after: Metrics, family: str, **labels) -> float | None:
    """Mean of a histogram's observations between two scrapes, in ms."""
    count = after.get(family + "_count", **labels) - before.get(family + "_count", **labels)
    total = after.get(family + "_sum", **labels) - before.get(family + "_sum", **labels)
    return None if count <= 0 else total / count * 1000


# --- 1. Overload ----------------------------------------------------------------


def scenario_overload(cfg: Config, workdir: Path) -> dict:
    checks = Checks()
    server = Server("overload", ["--queue-capacity", str(cfg.overload_queue)], workdir)
    try:
        server.wait_ready()
        capacity = bench(server, clients=cfg.capacity_clients, connections=4, duration_s=cfg.capacity_s)
        time.sleep(1.0)
        rss_before = server.rss()["VmRSS"]
        before = server.metrics()
        sampler = Sampler(server, 0.1)
        prober = LivenessProber(server.addr)
        sampler.start()
        prober.start()
        clients = cfg.capacity_clients * cfg.overload_factor
        overload = bench(
            server, clients=clients, connections=cfg.overload_connections,
            duration_s=cfg.overload_s, timeout=cfg.overload_deadline,
        )  # fmt: skip
        liveness = prober.stop()
        samples = sampler.stop()
        after = server.metrics()
        time.sleep(3.0)
        rss_after = server.rss()["VmRSS"]
        recovery = bench(server, clients=cfg.capacity_clients, connections=4, duration_s=min(cfg.capacity_s, 3.0))
        alive = server.proc.poll() is None
        code = server.stop()
    finally:
        server.close()

    errors = overload["errors"]
    total = overload["ok"] + sum(errors.values())
    shed = errors.get("ResourceExhausted", 0)
    deadline = errors.get("DeadlineExceeded", 0)
    client_timeouts = errors.get("Cancelled", 0)  # the client's own deadline expired first
    other = {k: v for k, v in errors.items() if k not in ("ResourceExhausted", "DeadlineExceeded", "Cancelled")}
    offered_rps = total / overload["duration_s"]
    peak = max(r for _, r, _ in samples)
    result = {
        "server": server.command(),
        "capacity": capacity,
        "overload": overload,
        "recovery": recovery,
        "clients": clients,
        "requests": total,
        "shed_resource_exhausted": shed,
        "shed_share": shed / total if total else None,
        "deadline_exceeded": deadline,
        "deadline_share": deadline / total if total else None,
        "client_deadline_expired": client_timeouts,
        "other_errors": other,
        "offered_rps": offered_rps,
        "offered_vs_capacity": offered_rps / capacity["throughput_rps"],
        "accepted_rps": overload["throughput_rps"],
        "accepted_vs_capacity": overload["throughput_rps"] / capacity["throughput_rps"],
        "accepted_latency_ms": overload["latency_ms"],
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": peak,
        "rss_after_bytes": rss_after,
        "rss_samples": samples,
        "liveness": liveness,
        "server_requests_by_code": delta(after.by("splitserve_requests_total", "code", method="Compute"),
                                         before.by("splitserve_requests_total", "code", method="Compute")),
        "server_rejected_by_reason": delta(after.by("splitserve_rejected_requests_total", "reason"),
                                           before.by("splitserve_rejected_requests_total", "reason")),
        "server_mean_queue_wait_ms": histogram_mean_ms(before, after, "splitserve_queue_duration_seconds"),
        "server_mean_forward_ms": histogram_mean_ms(before, after, "splitserve_inference_duration_seconds"),
        "exit_code": code,
    }
    checks.add(capacity["ok"] > 0 and not capacity["errors"], "the capacity run answered every request")
    checks.add(shed > 0, "overload was shed with RESOURCE_EXHAUSTED")
    checks.add(not other, f"no failures other than RESOURCE_EXHAUSTED or a deadline (got {other or 'none'})")
    checks.add(overload["ok"] > 0, "requests were still accepted during the overload")
    checks.add(liveness["probes"] > 0 and liveness["serving"] == liveness["probes"],
               f"liveness answered SERVING to every probe ({liveness['serving']}/{liveness['probes']})")
    checks.add(alive and code == 0, f"the server survived and exited 0 on SIGTERM (exit code {code})")
    checks.add(recovery["ok"] > 0 and not recovery["errors"], "after the overload every request was answered again")
    result["checks"] = checks.items
    return result


# --- 2. Soak --------------------------------------------------------------------


def ok_compute_requests(m: Metrics) -> float:
    return m.get("splitserve_requests_total", code="OK", method="Compute")


def scenario_soak(cfg: Config, workdir: Path) -> dict:
    checks = Checks()
    target = cfg.soak_requests
    server = Server("soak", [], workdir)
    chunks = []
    try:
        server.wait_ready()
        rss_start = server.rss()["VmRSS"]
        sampler = Sampler(server, 0.5, counter=ok_compute_requests)
        sampler.start()
        t0 = time.monotonic()
        done = 0
        rate = None
        while done < target:
            remaining = target - done
            duration = cfg.soak_chunk_s if rate is None else min(cfg.soak_chunk_s, max(0.5, remaining / rate * 1.02))
            report = bench(server, clients=cfg.soak_clients, connections=4, duration_s=duration, warmup_s=0)
            chunks.append(report)
            if report["ok"] == 0:
                raise server.fail("a soak chunk answered no request")
            rate = report["throughput_rps"]
            done = int(ok_compute_requests(server.metrics()))
            if len(chunks) > 1000:
                raise server.fail("the soak did not reach its request count")
        elapsed = time.monotonic() - t0
        samples = sampler.stop()
        code = server.stop()
    finally:
        server.close()

    counted = [(t, r, c) for t, r, c in samples if c is not None]

    def rss_at(fraction: float):
        want = fraction * target
        for t, r, c in counted:
            if c >= want:
                return {"requests": int(c), "seconds": t, "rss_bytes": r}
        return None

    deciles = [rss_at(f / 10) for f in range(1, 11)]
    at10, at100 = deciles[0], deciles[-1]
    errors = {}
    for c in chunks:
        for k, v in c["errors"].items():
            errors[k] = errors.get(k, 0) + v
    growth = None if not (at10 and at100) else at100["rss_bytes"] - at10["rss_bytes"]
    result = {
        "server": server.command(),
        "bench": chunks[0]["command"] if chunks else None,
        "clients": cfg.soak_clients,
        "requests_target": target,
        "requests_answered": done,
        "chunks": len(chunks),
        "errors": errors,
        "elapsed_s": elapsed,
        "throughput_rps": done / elapsed if elapsed else None,
        "rss_start_bytes": rss_start,
        "rss_peak_bytes": max(r for _, r, _ in samples),
        "rss_at_10_percent": at10,
        "rss_at_100_percent": at100,
        "rss_deciles": deciles,
        "rss_growth_bytes": growth,
        "rss_growth_share": None if growth is None else growth / at10["rss_bytes"],
        "p99_ms_per_chunk_max": max(c["latency_ms"]["p99"] for c in chunks),
        "p50_ms_per_chunk_median": sorted(c["latency_ms"]["p50"] for c in chunks)[len(chunks) // 2],
        "rss_samples": samples,
        "exit_code": code,
    }
    checks.add(done >= target, f"{done:,} requests answered OK (target {target:,})")
    checks.add(not errors, f"no request failed (got {errors or 'none'})")
    checks.add(at10 is not None and at100 is not None, "RSS was sampled at 10% and at 100% of the requests")
    if growth is not None:
        checks.add(result["rss_growth_share"] <= cfg.soak_growth_limit,
                   f"RSS grew at most {cfg.soak_growth_limit:.0%} from 10% to 100% of the run "
                   f"({result['rss_growth_share']:+.2%})")
    checks.add(code == 0, f"exit code 0 on SIGTERM (got {code})")
    result["checks"] = checks.items
    return result


# --- 3. SIGTERM with requests in flight ------------------------------------------


def scenario_sigterm(cfg: Config, workdir: Path) -> dict:
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pb2, pb2_grpc = stubs()
    checks = Checks()
    n = cfg.sigterm_requests
    flags = [
        "--model", f"slow=builtin:delay:{cfg.sigterm_model_ms}",
        "--workers", str(cfg.sigterm_workers), "--intra-op-threads", "1",
    ]  # fmt: skip
    server = Server("sigterm", flags, workdir)
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(server.addr)
        stub = pb2_grpc.ComputeServiceStub(channel)
        inputs = [np.full((1, 4), float(i), dtype=np.float32) for i in range(n)]
        answered = {}

        def on_done(i):
            def cb(future):
                answered[i] = (future.code().name, time.monotonic(), future)
            return cb

        futures = []
        for i, x in enumerate(inputs):
            f = stub.Compute.future(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 4]), timeout=120)
            f.add_done_callback(on_done(i))
            futures.append(f)
        # All of them inside the server (in flight: computing or queued) before the signal.
        deadline = time.monotonic() + 10
        while True:
            m = server.metrics()
            inflight = int(m.get("splitserve_inflight_requests"))
            queued = int(m.get("splitserve_queue_depth", model="slow"))
            if inflight >= n or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        answered_before = len(answered)
        t_signal = time.monotonic()
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        # What a new request and the readiness check see while draining.
        try:
            stub.Compute(pb2.ComputeRequest(data=inputs[0].tobytes(), shape=[1, 4]), timeout=5)
            new_request = "OK"
        except grpc.RpcError as e:
            new_request = e.code().name
        try:
            with grpc.insecure_channel(server.addr) as probe_channel:
                reply = health_pb2_grpc.HealthStub(probe_channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2)
                readiness = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            readiness = e.code().name
        for f in futures:
            with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError):
                f.result(timeout=120)
        t_all = time.monotonic()
        code = server.wait_exit(60)
        t_exit = time.monotonic()
        time.sleep(0.1)  # the last done-callbacks
        channel.close()
    finally:
        server.close()

    codes = {}
    correct = 0
    for i, (code_name, _, future) in answered.items():
        codes[code_name] = codes.get(code_name, 0) + 1
        if code_name == "OK":
            reply = future.result()
            correct += int(np.array_equal(np.frombuffer(reply.data, dtype=np.float32).reshape(1, 4), inputs[i]))
    last_answer = max((t for _, t, _ in answered.values()), default=t_all)
    result = {
        "server": server.command(),
        "model_ms": cfg.sigterm_model_ms,
        "workers": cfg.sigterm_workers,
        "requests": n,
        "in_flight_at_signal": inflight,
        "queued_at_signal": queued,
        "answered_before_signal": answered_before,
        "answers_by_code": codes,
        "correct_answers": correct,
        "last_answer_after_signal_s": last_answer - t_signal,
        "exit_after_signal_s": t_exit - t_signal,
        "new_request_while_draining": new_request,
        "readiness_while_draining": readiness,
        "exit_code": code,
    }
    checks.add(inflight >= n, f"all {n} requests were in the server when SIGTERM came ({inflight} in flight, {queued} queued)")
    checks.add(codes.get("OK", 0) == n and correct == n, f"every request was answered OK with the right tensor ({codes})")
    checks.add(code == 0, f"exit code 0 (got {code})")
    checks.add(new_request == "UNAVAILABLE", f"a new request while draining got UNAVAILABLE (got {new_request})")
    checks.add(readiness != "SERVING", f"readiness was not SERVING while draining (got {readiness})")
    result["checks"] = checks.items
    return result


# --- 4. SIGKILL during training ---------------------------------------------------


def train_step(stub, pb2, k: int, backward_future: bool = False):
    """Step k of a fixed sequence: the same inputs and gradients every run
    (tests/python/test_durable.py's)."""
    import torch

    g = torch.Generator().manual_seed(1000 + k)
    data, shape = to_wire(torch.randn(4, 8, generator=g))
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, training_mode=True), timeout=30)
    gdata, gshape = to_wire(torch.randn(*reply.shape, generator=g))
    request = pb2.BackwardRequest(grad_output_data=gdata, grad_output_shape=gshape,
                                  forward_id=reply.forward_id, learning_rate=0.01)
    if backward_future:
        return stub.ComputeBackward.future(request, timeout=30)
    return stub.ComputeBackward(request, timeout=30)


def optimizer_steps(stub, pb2) -> int:
    return int(stub.GetServiceInfo(pb2.ServiceInfoRequest(), timeout=10).custom_info["model.top.optimizer_steps"])


def scenario_sigkill(cfg: Config, workdir: Path) -> dict:
    import grpc
    import torch

    pb2, pb2_grpc = stubs()
    checks = Checks()
    top = FIXTURES / "top.pt"
    if not top.is_file():
        raise ScenarioError(f"{top.relative_to(ROOT)} is missing: run `make fixtures`")

    def flags(ckpt: Path):
        return [
            "--model", f"top={top.relative_to(ROOT)}", "--trainable", "top", "--optimizer", "adam",
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(cfg.train_checkpoint_every),
        ]  # fmt: skip

    def start(name: str, ckpt: Path):
        s = Server(name, flags(ckpt), workdir, placeholders={ckpt: "CKPT_DIR"})
        ready_s = s.wait_ready()
        channel = grpc.insecure_channel(s.addr)
        return s, channel, pb2_grpc.ComputeServiceStub(channel), ready_s

    def parameters(path: Path) -> dict:
        return {n: p.detach().clone() for n, p in torch.jit.load(str(path)).named_parameters()}

    steps, kill_after = cfg.train_steps, cfg.train_kill_after
    # Uninterrupted.
    whole = workdir / "ckpt-whole"
    s, channel, stub, _ = start("train-whole", whole)
    try:
        for k in range(steps):
            train_step(stub, pb2, k)
        channel.close()
        code_whole = s.stop()
    finally:
        s.close()
    expected = parameters(whole / "top.pt")

    # Interrupted: SIGKILL while step kill_after's backward is in flight.
    crashed = workdir / "ckpt-crashed"
    s, channel, stub, _ = start("train-crashed", crashed)
    try:
        for k in range(kill_after):
            train_step(stub, pb2, k)
        pending = train_step(stub, pb2, kill_after, backward_future=True)
        s.proc.kill()
        killed_code = s.proc.wait(30)
        with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError):
            pending.result(timeout=10)
        in_flight_code = pending.code().name
        channel.close()
    finally:
        s.close()
    kept = sorted(p.name for p in (crashed / "top.ckpt").iterdir()) if (crashed / "top.ckpt").is_dir() else []
    partial = [n for n in kept if not n.startswith("step-")]

    s, channel, stub, restart_s = start("train-resumed", crashed)
    try:
        resumed_from = optimizer_steps(stub, pb2)
        for k in range(resumed_from, steps):
            train_step(stub, pb2, k)
        final_steps = optimizer_steps(stub, pb2)
        partial_left = [n for n in partial if (crashed / "top.ckpt" / n).exists()]
        channel.close()
        code_resumed = s.stop()
        server_command = s.command()
    finally:
        s.close()
    resumed = parameters(crashed / "top.pt")

    max_diff = 0.0
    for name, value in expected.items():
        if name in resumed and resumed[name].shape == value.shape:
            max_diff = max(max_diff, float((resumed[name] - value).abs().max()))
        else:
            max_diff = float("inf")
    identical = resumed.keys() == expected.keys() and all(torch.equal(resumed[n], expected[n]) for n in expected)
    result = {
        "server": server_command,
        "steps": steps,
        "checkpoint_every": cfg.train_checkpoint_every,
        "killed_during_step": kill_after + 1,
        "killed_exit": killed_code,
        "in_flight_backward": in_flight_code,
        "checkpoints_after_kill": [n for n in kept if n.startswith("step-")],
        "partial_after_kill": partial,
        "partial_after_restart": partial_left,
        "resumed_from_step": resumed_from,
        "steps_redone": kill_after + 1 - resumed_from if resumed_from <= kill_after + 1 else 0,
        "restart_to_ready_s": restart_s,
        "final_optimizer_steps": final_steps,
        "parameters": {n: list(v.shape) for n, v in expected.items()},
        "max_abs_diff": max_diff,
        "bit_identical": identical,
        "exit_codes": {"uninterrupted": code_whole, "resumed": code_resumed},
    }
    every = cfg.train_checkpoint_every
    checks.add(killed_code == -signal.SIGKILL, f"the server died of SIGKILL (exit status {killed_code})")
    checks.add(resumed_from % every == 0 and 0 < resumed_from <= kill_after + 1,
               f"the restarted server resumed from its newest checkpoint (step {resumed_from})")
    checks.add(final_steps == steps, f"the resumed run reached step {steps} (got {final_steps})")
    checks.add(not partial_left, f"the restart removed what the kill left half-written ({partial_left or 'nothing left'})")
    checks.add(max_diff <= cfg.train_tolerance,
               f"parameters equal the uninterrupted run's within {cfg.train_tolerance:g} (max abs diff {max_diff:.3g})")
    checks.add(code_whole == 0 and code_resumed == 0, "both runs exited 0 on SIGTERM")
    result["checks"] = checks.items
    return result


# --- 5. Connection rotation under load -------------------------------------------


def scenario_rotation(cfg: Config, workdir: Path) -> dict:
    import grpc
    import numpy as np

    pb2, pb2_grpc = stubs()
    checks = Checks()
    flags = ["--max-connection-age", cfg.rotation_age, "--max-connection-age-grace", cfg.rotation_grace]
    # Connection-level events of the HTTP/2 layer (a few lines per connection, no
    # per-request logging): how each aged-out connection really ended.
    env = {"RUST_LOG": "info,splitserve::access=off,h2::proto::connection=debug,h2::proto::streams::recv=debug"}
    server = Server("rotation", flags, workdir, env=env)
    try:
        server.wait_ready()
        before = server.metrics().get("splitserve_connections_total", port="grpc")
        # One long-lived channel with splitlearn_comm's options, as its GRPCComputeClient keeps.
        channel = grpc.insecure_channel(server.addr, options=[
            ("grpc.max_send_message_length", 100 * MIB),
            ("grpc.max_receive_message_length", 100 * MIB),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
        ])  # fmt: skip
        stub = pb2_grpc.ComputeServiceStub(channel)
        request = pb2.ComputeRequest(data=np.ones((1, 512), dtype=np.float32).tobytes(), shape=[1, 512])
        stop_at = time.monotonic() + cfg.rotation_s
        latencies, failures = [], []

        def client():
            mine = []
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try:
                    reply = stub.Compute(request, timeout=30)
                    if list(reply.shape) != [1, 512]:
                        failures.append(("WRONG_SHAPE", str(list(reply.shape))))
                    mine.append(time.perf_counter() - t)
                except grpc.RpcError as e:
                    failures.append((e.code().name, e.details()))
            latencies.extend(mine)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(cfg.rotation_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(cfg.rotation_s + 60)
        elapsed = time.monotonic() - t0
        if any(t.is_alive() for t in threads):
            raise server.fail("a client thread hung")
        rotated = server.metrics().get("splitserve_connections_total", port="grpc") - before
        channel.close()
        code = server.stop()
        h2_errors = h2_connection_errors(server.log_lines())
    finally:
        server.close()
    latencies.sort()
    by_code = {}
    for c, _ in failures:
        by_code[c] = by_code.get(c, 0) + 1
    age_s = parse_seconds(cfg.rotation_age)
    result = {
        "server": server.command(),
        "threads": cfg.rotation_threads,
        "duration_s": elapsed,
        "requests_ok": len(latencies),
        "failures": len(failures),
        "failures_by_code": by_code,
        "failure_examples": failures[:5],
        "throughput_rps": len(latencies) / elapsed,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": latencies[-1] * 1000 if latencies else None,
        },
        "new_connections": int(rotated),
        "h2_connection_errors": len(h2_errors),
        "h2_error_lines": h2_errors[:6],
        "expected_rotations": int(cfg.rotation_s // age_s),
        "exit_code": code,
    }
    checks.add(not failures, f"0 failed requests (got {len(failures)}: {by_code or 'none'})")
    checks.add(len(latencies) > 0, f"{len(latencies):,} requests answered")
    checks.add(rotated >= max(2, cfg.rotation_s // age_s // 2),
               f"the channel reconnected as connections aged out ({int(rotated)} new connections)")
    checks.add(code == 0, f"exit code 0 on SIGTERM (got {code})")
    result["checks"] = checks.items
    return result


def h2_connection_errors(lines: list) -> list:
    """The HTTP/2 layer's connection errors other than NO_ERROR (a clean GOAWAY),
    each with the stream-level reason logged just before it; a connection logs
    its error more than once, so repeats in a row count once."""
    events, last, reason = [], None, None
    for line in lines:
        text = line.split(": ", 1)[-1]
        if "h2::proto::streams" in line:
            reason = line[line.index("h2::"):]
        elif "connection error" in line and "NO_ERROR" not in line:
            error = line[line.index("h2::"):] if "h2::" in line else text
            if error != last:
                events.append(error if reason is None else f"{reason} -> {error}")
            last, reason = error, None
        elif "connection error" in line:
            last, reason = None, None
    return events


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


RUNNERS = {
    "overload": scenario_overload,
    "soak": scenario_soak,
    "sigterm": scenario_sigterm,
    "sigkill": scenario_sigkill,
    "rotation": scenario_rotation,
}


# --- Facts ----------------------------------------------------------------------


def command_output(argv: list):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def package_version(name: str):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_total() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine_facts() -> dict:
    # Whether the binary's sources differ from the commit (the report itself may be uncommitted).
    dirty = command_output(["git", "status", "--porcelain", "--", "src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_bytes": memory_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": package_version("grpcio"),
        "torch": package_version("torch"),
        "splitserve": command_output([str(BIN), "--version"]),  # version, libtorch, CUDA, build commit
        "git_commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "sources_modified": None if dirty is None else bool(dirty),
        "loadavg_at_start": load_average(),
    }


def load_average():
    """The 1-minute load average: other work on the machine skews every figure."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return None


# --- Report ---------------------------------------------------------------------


def version_line(text) -> str:
    """`splitserve --version` (name and version, libtorch, CUDA, build commit) on one line."""
    lines = (text or "splitserve (version unknown)").splitlines()
    return lines[0] + (f" ({', '.join(lines[1:])})" if len(lines) > 1 else "")


def fmt_ms(v) -> str:
    return "n/a" if v is None else f"{v:,.2f} ms"


def fmt_elapsed(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.0f} minutes"


def fmt_mib(v) -> str:
    return "n/a" if v is None else f"{v / MIB:,.1f} MiB"


def fmt_share(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def verdict(result: dict) -> str:
    if "error" in result:
        return "could not run"
    return "pass" if all(c["ok"] for c in result.get("checks", [])) else "FAIL"


def checks_lines(result: dict) -> list:
    if "error" in result:
        return ["", "Could not run:", "", "```", result["error"], "```"]
    lines = ["", "Checks:", ""]
    for c in result.get("checks", []):
        lines.append(f"- {'pass' if c['ok'] else '**FAIL**'}: {c['what']}")
    return lines


def render_markdown(report: dict) -> str:
    m, cfg, s = report["machine"], report["config"], report["scenarios"]
    quick = report.get("quick")
    out = [
        "# Reliability",
        "",
        "Generated by `scripts/reliability.py`; do not edit by hand. Reproduce with "
        "`make reliability` (which runs `.venv/bin/python scripts/reliability.py`; "
        f"{fmt_elapsed(report['elapsed_s'])} here). Raw numbers: `docs/reliability.json`.",
        "",
    ]
    if quick:
        out += ["**Smoke run (`--quick`): shortened scenarios, not the published figures.**", ""]
    mem = m.get("memory_bytes")
    out += [
        "## Machine",
        "",
        f"- {m['cores']} cores ({m['cpu_model']}), "
        f"{'' if mem is None else f'{mem / 1024**3:.0f} GiB memory, '}Linux {m['kernel']}",
        f"- {version_line(m.get('splitserve'))}; checkout at commit {m['git_commit']}"
        + (" with uncommitted changes to the sources" if m.get("sources_modified") else ""),
        f"- Python {m['python']}, grpcio {m['grpcio']}, torch {m['torch']}",
        f"- Date: {m['date']}"
        + ("" if m.get("loadavg_at_start") is None
           else f"; 1-minute load average {m['loadavg_at_start']} before the run, {m.get('loadavg_at_end')} at its end "
                "(the run's own load included)"),
        "",
        "Every scenario starts its own `splitserve serve` on free loopback ports "
        "and stops it afterwards; the models run on the CPU (`--device cpu`). The load "
        "generators (`splitserve bench`, a closed loop: each client sends its next "
        "request when the last returns; grpcio clients with stubs compiled from "
        "`proto/`) run on the same machine and compete with the server for its "
        f"{m['cores']} cores. RSS is VmRSS of `/proc/PID/status`; server-side counts "
        "come from the admin `/metrics` endpoint.",
        "",
        "## Summary",
        "",
        "| scenario | figure | result |",
        "| --- | --- | --- |",
    ]
    o = s.get("overload", {})
    if "error" not in o and o:
        out.append(
            f"| [10x overload](#1-10x-overload) | {fmt_share(o['shed_share'])} shed with RESOURCE_EXHAUSTED; "
            f"accepted requests p99 {fmt_ms(o['accepted_latency_ms']['p99'])}; RSS "
            f"{fmt_mib(o['rss_before_bytes'])} before, {fmt_mib(o['rss_peak_bytes'])} peak, "
            f"{fmt_mib(o['rss_after_bytes'])} after | {verdict(o)} |")
    elif o:
        out.append(f"| [10x overload](#1-10x-overload) | | {verdict(o)} |")
    k = s.get("soak", {})
    if "error" not in k and k:
        g = k["rss_growth_bytes"]
        growth = "n/a" if g is None else f"{g / MIB:+.1f} MiB, {k['rss_growth_share']:+.2%}"
        out.append(
            f"| [soak](#2-soak-{k['requests_target']}-requests) | {k['requests_answered']:,} requests, "
            f"{sum(k['errors'].values())} failed; RSS {fmt_mib(k['rss_at_10_percent']['rss_bytes'])} at 10%, "
            f"{fmt_mib(k['rss_at_100_percent']['rss_bytes'])} at 100% "
            f"({growth}) | {verdict(k)} |")
    elif k:
        out.append(f"| [soak](#2-soak) | | {verdict(k)} |")
    t = s.get("sigterm", {})
    if "error" not in t and t:
        out.append(
            f"| [SIGTERM with requests in flight](#3-sigterm-with-requests-in-flight) | "
            f"{t['answers_by_code'].get('OK', 0)}/{t['requests']} answered OK, exit code {t['exit_code']}, "
            f"exited {t['exit_after_signal_s']:.1f} s after the signal | {verdict(t)} |")
    elif t:
        out.append(f"| [SIGTERM with requests in flight](#3-sigterm-with-requests-in-flight) | | {verdict(t)} |")
    x = s.get("sigkill", {})
    if "error" not in x and x:
        out.append(
            f"| [SIGKILL during training](#4-sigkill-during-training) | killed in step {x['killed_during_step']} "
            f"of {x['steps']}, resumed from step {x['resumed_from_step']}; max abs difference to an "
            f"uninterrupted run {x['max_abs_diff']:.3g}{' (bit-identical)' if x['bit_identical'] else ''} | {verdict(x)} |")
    elif x:
        out.append(f"| [SIGKILL during training](#4-sigkill-during-training) | | {verdict(x)} |")
    r = s.get("rotation", {})
    if "error" not in r and r:
        out.append(
            f"| [connection rotation under load](#5-connection-rotation-under-load) | {r['failures']} failed of "
            f"{r['requests_ok'] + r['failures']:,} requests; {r['new_connections']} new connections in "
            f"{r['duration_s']:.0f} s"
            + (f"; {r['h2_connection_errors']} closed with an HTTP/2 error" if r.get("h2_connection_errors") else "")
            + f" | {verdict(r)} |")
    elif r:
        out.append(f"| [connection rotation under load](#5-connection-rotation-under-load) | | {verdict(r)} |")

    # 1. Overload
    if o:
        out += ["", "## 1. 10x overload", ""]
        if "error" not in o:
            cap, ov = o["capacity"], o["overload"]
            lat = o["accepted_latency_ms"]
            live = o["liveness"]
            out += [
                f"First the capacity: {cfg['capacity_clients']} closed-loop clients on the default model "
                f"(`builtin:mlp:512x1024x512`, input 1x512) for {cap['duration_s']:.0f} s got "
                f"**{cap['throughput_rps']:,.0f} requests/s** (p50 {fmt_ms(cap['latency_ms']['p50'])}, "
                f"p99 {fmt_ms(cap['latency_ms']['p99'])}). Then {o['clients']} clients "
                f"({cfg['overload_factor']}x) for {ov['duration_s']:.0f} s, each with a "
                f"{cfg['overload_deadline']} deadline, against a queue of {cfg['overload_queue']} "
                f"(`--queue-capacity`). A refused client retries after 1 ms.",
                "",
                "| figure | value | what it means |",
                "| --- | --- | --- |",
                f"| requests sent | {o['requests']:,} ({o['offered_rps']:,.0f}/s, {o['offered_vs_capacity']:.1f}x capacity) | "
                "the offered load: accepted plus refused, per second of the run |",
                f"| shed with RESOURCE_EXHAUSTED | {o['shed_resource_exhausted']:,} ({fmt_share(o['shed_share'])}) | "
                "refused at once because the model's queue was full: no compute, no queueing, the client "
                "can back off or go to another replica |",
                f"| DEADLINE_EXCEEDED | {o['deadline_exceeded']:,} ({fmt_share(o['deadline_share'])}) | "
                "dropped by the server because the deadline passed while queued (never computed) |",
                f"| client deadline expired | {o['client_deadline_expired']:,} | "
                "the client gave up first (its deadline passed in flight; tonic reports CANCELLED) |",
                f"| other failures | {sum(o['other_errors'].values()):,} | anything else (UNAVAILABLE, INTERNAL, ...) |",
                f"| accepted | {ov['ok']:,} ({o['accepted_rps']:,.0f}/s, {o['accepted_vs_capacity']:.0%} of capacity) | "
                "goodput under overload, against the capacity run: the server keeps computing while it refuses; "
                f"refusing costs CPU too, and {o['clients']} clients share the cores with it |",
                f"| accepted latency p50 / p99 / max | {fmt_ms(lat['p50'])} / {fmt_ms(lat['p99'])} / {fmt_ms(lat['max'])} | "
                f"client-side, of the requests answered OK (the capacity run: p50 {fmt_ms(cap['latency_ms']['p50'])}, "
                f"p99 {fmt_ms(cap['latency_ms']['p99'])}). Server-side, an accepted request waited "
                f"{fmt_ms(o['server_mean_queue_wait_ms'])} in the queue on average (at most "
                f"{cfg['overload_queue']} ahead of it) and its forward took {fmt_ms(o['server_mean_forward_ms'])}; "
                f"the rest is gRPC on both sides, with {o['clients']} clients sharing the {m['cores']} cores |",
                f"| RSS before / peak / after | {fmt_mib(o['rss_before_bytes'])} / {fmt_mib(o['rss_peak_bytes'])} / "
                f"{fmt_mib(o['rss_after_bytes'])} | idle after the capacity run; highest sample (every 100 ms) during "
                f"the overload ({(o['rss_peak_bytes'] - o['rss_before_bytes']) / MIB:+.1f} MiB); 3 s after it |",
                f"| liveness | {live['serving']}/{live['probes']} SERVING, p50 {fmt_ms(live['p50_ms'])}, max {fmt_ms(live['max_ms'])} | "
                "grpc.health.v1 `Check(service=\"liveness\")` every 200 ms during the overload (1 s deadline): "
                "a Kubernetes liveness probe would not restart the pod |",
                f"| after the overload | {o['recovery']['throughput_rps']:,.0f} requests/s, "
                f"{sum(o['recovery']['errors'].values())} failed | {cfg['capacity_clients']} clients again, right after |",
                "",
                f"Server-side counts of the whole overload run (warm-up included): "
                f"{', '.join(f'{c} {v:,}' for c, v in sorted(o['server_requests_by_code'].items())) or 'none'}; "
                f"rejections by reason: {', '.join(f'{c} {v:,}' for c, v in sorted(o['server_rejected_by_reason'].items())) or 'none'}.",
                "",
                f"Why {o['offered_vs_capacity']:.1f}x and not 10x the request rate: the overload is 10x the "
                "clients, each a closed loop, so the rate they offer is what this machine's "
                f"{m['cores']} cores can send and refuse next to the server; 10x the capacity in requests/s "
                "cannot be generated beside it. With the server at capacity, the share shed is "
                "1 - accepted/offered, so an offered 10x would shed about 90%.",
                "",
                "Commands:",
                "",
                "```sh",
                o["server"],
                cap["command"],
                ov["command"],
                "```",
            ]
        out += checks_lines(o)

    # 2. Soak
    if k:
        title = f"## 2. Soak: {k['requests_target']:,} requests" if "error" not in k else "## 2. Soak"
        out += ["", title, ""]
        if "error" not in k:
            out += [
                f"{k['clients']} closed-loop clients on the default model until the server had answered "
                f"{k['requests_target']:,} requests ({k['chunks']} consecutive `splitserve bench` runs, "
                "each opening its own connections). RSS and the server's count of answered requests "
                "sampled every 500 ms.",
                "",
                "| figure | value | what it means |",
                "| --- | --- | --- |",
                f"| requests answered | {k['requests_answered']:,} in {k['elapsed_s']:.0f} s "
                f"({k['throughput_rps']:,.0f}/s) | the server's `splitserve_requests_total{{code=\"OK\"}}` |",
                f"| failed | {sum(k['errors'].values()):,} | any non-OK answer the clients saw |",
                f"| RSS at start | {fmt_mib(k['rss_start_bytes'])} | ready and idle, models loaded and warmed up |",
                f"| RSS at 10% | {fmt_mib(k['rss_at_10_percent']['rss_bytes'])} | first sample after "
                f"{k['rss_at_10_percent']['requests']:,} requests: warmed up under load, the baseline of the growth |",
                f"| RSS at 100% | {fmt_mib(k['rss_at_100_percent']['rss_bytes'])} | first sample after "
                f"{k['rss_at_100_percent']['requests']:,} requests |",
                f"| growth, 10% to 100% | {k['rss_growth_bytes'] / MIB:+.1f} MiB ({k['rss_growth_share']:+.2%}) | "
                "what a leak would show: memory that grows with the requests served rather than with the load "
                f"(the check fails above {cfg['soak_growth_limit']:.0%}) |",
                f"| RSS peak | {fmt_mib(k['rss_peak_bytes'])} | highest sample of the run |",
                f"| latency | p50 {fmt_ms(k['p50_ms_per_chunk_median'])}, p99 at most {fmt_ms(k['p99_ms_per_chunk_max'])} | "
                "median of the runs' p50, highest of their p99 |",
                "",
                "RSS through the run:",
                "",
                "| requests | " + " | ".join(f"{(i + 1) * 10}%" for i in range(10)) + " |",
                "| --- |" + " ---: |" * 10,
                "| RSS (MiB) | " + " | ".join("n/a" if d is None else f"{d['rss_bytes'] / MIB:.1f}" for d in k["rss_deciles"]) + " |",
                "",
                "Commands:",
                "",
                "```sh",
                k["server"],
                k["bench"] + "   # repeated until the count is reached",
                "```",
            ]
        out += checks_lines(k)

    # 3. SIGTERM
    if t:
        out += ["", "## 3. SIGTERM with requests in flight", ""]
        if "error" not in t:
            out += [
                f"A slow model (`builtin:delay:{t['model_ms']}`: sleeps {t['model_ms']} ms, then answers its "
                f"input) with {t['workers']} workers. {t['requests']} requests were sent at once on one channel; "
                "once the server counted all of them in flight (computing or queued), it got SIGTERM "
                "(`--shutdown-grace` at its default, 30 s).",
                "",
                "| figure | value | what it means |",
                "| --- | --- | --- |",
                f"| in flight at the signal | {t['in_flight_at_signal']} ({t['queued_at_signal']} of them queued) | "
                "`splitserve_inflight_requests` and `splitserve_queue_depth` just before SIGTERM |",
                f"| answered | {', '.join(f'{c} {v}' for c, v in sorted(t['answers_by_code'].items()))}; "
                f"{t['correct_answers']} with the right tensor | every request accepted before the signal is finished, "
                "queued ones included |",
                f"| last answer | {t['last_answer_after_signal_s']:.2f} s after the signal | "
                f"about {t['requests']} x {t['model_ms']} ms / {t['workers']} workers: the queue drained at full speed |",
                f"| exit | code {t['exit_code']}, {t['exit_after_signal_s']:.2f} s after the signal | "
                "a clean exit once the last request was answered, well within the grace |",
                f"| a new request while draining | {t['new_request_while_draining']} | "
                "sent 200 ms after the signal: refused, so the client retries elsewhere |",
                f"| readiness while draining | {t['readiness_while_draining']} | grpc.health.v1 `Check(service=\"\")` "
                "on a new connection, what a readiness probe sees: the pod leaves the Service's endpoints |",
                "",
                "```sh",
                t["server"],
                "```",
            ]
        out += checks_lines(t)

    # 4. SIGKILL
    if x:
        out += ["", "## 4. SIGKILL during training", ""]
        if "error" not in x:
            out += [
                f"Split training of `tests/fixtures/generated/top.pt` with Adam, durable checkpoints every "
                f"{x['checkpoint_every']} optimizer steps. A fixed sequence of {x['steps']} steps (step k: "
                "Compute with `training_mode=true` on inputs seeded with k, then ComputeBackward with "
                "`learning_rate=0.01` and a gradient seeded with k; as in `tests/python/test_durable.py`) ran "
                f"once uninterrupted. A second run was killed with SIGKILL while the backward of step "
                f"{x['killed_during_step']} was in flight, restarted on the same checkpoint directory, asked "
                "GetServiceInfo for its step count, and ran the remaining steps from there. Both runs' "
                "parameters are compared as `torch.jit.load(CKPT_DIR/top.pt)` saved them on SIGTERM.",
                "",
                "| figure | value | what it means |",
                "| --- | --- | --- |",
                f"| killed | during step {x['killed_during_step']} of {x['steps']} (signal {-x['killed_exit']}); "
                f"the backward in flight got {x['in_flight_backward']} | no shutdown: nothing is saved beyond the "
                "checkpoints already on disk |",
                f"| checkpoints on disk after the kill | complete: {', '.join(x['checkpoints_after_kill']) or 'none'}; "
                f"unfinished: {', '.join(x.get('partial_after_kill', [])) or 'none'} | "
                "a checkpoint is written under a temporary name and renamed once complete and fsynced, so a kill "
                "in the middle of a write leaves a `.tmp-` directory that is never loaded"
                + (f"; the restart removed it ({'none left' if not x.get('partial_after_restart') else 'still there: ' + ', '.join(x['partial_after_restart'])})"
                   if x.get("partial_after_kill") else "") + " |",
                f"| restart to ready | {x['restart_to_ready_s']:.2f} s | process start to SERVING, checkpoint loaded |",
                f"| resumed from step | {x['resumed_from_step']} | the newest checkpoint; the client redid the "
                f"{x['steps_redone']} step(s) after it |",
                f"| max abs difference | {x['max_abs_diff']:.3g} ({'bit-identical' if x['bit_identical'] else 'not bit-identical'}) | "
                f"over every parameter ({', '.join(f'{n} {v}' for n, v in x['parameters'].items())}) against the "
                f"uninterrupted run; the check allows {cfg['train_tolerance']:g} |",
                "",
                "```sh",
                x["server"],
                "```",
            ]
        out += checks_lines(x)

    # 5. Rotation
    if r:
        out += ["", "## 5. Connection rotation under load", ""]
        if "error" not in r:
            out += [
                f"One grpcio channel (splitlearn_comm's options), {r['threads']} threads sending Compute "
                f"(1x512, default model) back to back for {r['duration_s']:.0f} s, with the server aging "
                f"connections out after {cfg['rotation_age']} (GOAWAY; calls in flight get "
                f"{cfg['rotation_grace']} to finish).",
                "",
                "| figure | value | what it means |",
                "| --- | --- | --- |",
                f"| failed requests | {r['failures']} of {r['requests_ok'] + r['failures']:,} | "
                "what a rotation should cost: nothing; calls in flight finish on the old connection, the next "
                "ones go to the new one |",
                f"| new connections | {r['new_connections']} (about {r['expected_rotations']} expected) | "
                "`splitserve_connections_total{port=\"grpc\"}` during the run: one per rotation |",
                f"| connections closed with an HTTP/2 error | {r.get('h2_connection_errors', 'n/a')} of "
                f"{r['new_connections']} | how the server's HTTP/2 layer (h2) ended each connection, from its "
                "connection-level debug log. Anything but a clean GOAWAY(NO_ERROR) tears the connection down at "
                "once: a call still in flight on it at that moment fails with UNAVAILABLE |",
                f"| throughput | {r['throughput_rps']:,.0f} requests/s | Python clients, so far below the server's capacity |",
                f"| latency p50 / p99 / max | {fmt_ms(r['latency_ms']['p50'])} / {fmt_ms(r['latency_ms']['p99'])} / "
                f"{fmt_ms(r['latency_ms']['max'])} | client-side; the max includes the reconnects |",
                "",
            ]
            if r.get("h2_error_lines"):
                out += ["The HTTP/2 layer's log for those connections (the stream-level reason, then the "
                        "connection error it caused):", ""]
                out += [f"- `{line}`" for line in r["h2_error_lines"]]
                out.append("")
            if r["failures"]:
                out += ["What the failed requests got (code: message, count):", ""]
                seen = {}
                for code_name, details in r["failure_examples"]:
                    seen[f"{code_name}: {details}"] = seen.get(f"{code_name}: {details}", 0) + 1
                out += [f"- `{k}` ({n})" for k, n in seen.items()]
                if r["failures"] > len(r["failure_examples"]):
                    out.append(f"- (first {len(r['failure_examples'])} of {r['failures']} shown)")
                out.append("")
            out += [
                "```sh",
                r["server"],
                "```",
            ]
        out += checks_lines(r)
    out.append("")
    return "\n".join(out)


# --- Main -----------------------------------------------------------------------


def run_all(cfg: Config, only: list, workdir: Path) -> dict:
    results = {}
    for name in only:
        print(f"[{name}] running", flush=True)
        t = time.monotonic()
        try:
            results[name] = RUNNERS[name](cfg, workdir)
        except Exception as e:  # noqa: BLE001 - every scenario reports, the others still run
            message = scrub(f"{type(e).__name__}: {e}" if not isinstance(e, ScenarioError) else str(e))
            results[name] = {"error": message}
        for s in list(_live_servers):
            s.close()
        results[name]["scenario_s"] = round(time.monotonic() - t, 1)
        print(f"[{name}] {verdict(results[name])} in {results[name]['scenario_s']:.0f} s", flush=True)
        for c in results[name].get("checks", []):
            if not c["ok"]:
                print(f"  FAIL: {c['what']}", flush=True)
        if "error" in results[name]:
            print("  " + results[name]["error"].replace("\n", "\n  "), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short scenarios, written to a temp dir")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--out-dir", type=Path, help="where reliability.md and .json go (default: docs/, or a temp dir with --quick)")
    parser.add_argument("--from-json", type=Path, help="re-render the markdown from a JSON report and exit")
    args = parser.parse_args()

    if args.from_json:
        report = json.loads(args.from_json.read_text())
        md = args.from_json.with_suffix(".md")
        md.write_text(render_markdown(report))
        print(f"wrote {md}")
        return 0

    cfg = QUICK if args.quick else Config()
    workdir = Path(tempfile.mkdtemp(prefix="splitserve-reliability-"))
    started = time.monotonic()
    stubs()
    machine = machine_facts()
    print(f"splitserve reliability: {', '.join(args.only)}{' (quick)' if args.quick else ''}; "
          f"{machine['cores']} cores, commit {machine['git_commit']}; work dir {workdir}", flush=True)
    results = run_all(cfg, args.only, workdir)
    machine["loadavg_at_end"] = load_average()
    report = {
        "schema_version": SCHEMA_VERSION,
        "quick": args.quick,
        "machine": machine,
        "config": cfg.__dict__,
        "elapsed_s": round(time.monotonic() - started, 1),
        "scenarios": results,
    }
    failed = [n for n, r in results.items() if verdict(r) != "pass"]
    could_not_run = [n for n, r in results.items() if "error" in r]
    if args.out_dir:
        out_dir = args.out_dir
    elif args.quick or could_not_run or set(args.only) != set(SCENARIOS):
        out_dir = workdir
    else:
        out_dir = DEFAULT_JSON.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / DEFAULT_JSON.name, out_dir / DEFAULT_MARKDOWN.name
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render_markdown(report))
    print(f"wrote {md_path} and {json_path.name} in {report['elapsed_s'] / 60:.1f} min", flush=True)
    if not could_not_run and out_dir != workdir:
        shutil.rmtree(workdir, ignore_errors=True)  # server logs and checkpoints, no longer needed
    if failed:
        where = ("the report marks them" if out_dir != workdir
                 else f"{DEFAULT_MARKDOWN.relative_to(ROOT)} left as it was; server logs in {workdir}")
        print(f"FAILED: {', '.join(failed)} ({where})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

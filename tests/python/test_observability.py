"""Metrics, dashboards and alerts against real components: promtool and a real
Prometheus server (Debian's `prometheus` package) scraping a live splitserve
under load. An empty panel, a misspelt metric name or a panel that shows a value
that never happened (a batch size of 0.5) fails here."""

import json
import math
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from conftest import BIN, ROOT, Server, cuda_available, fixture_path, free_port, metric_value, wait_until

DASHBOARD = ROOT / "dashboards" / "splitserve-contention.json"
ALERTS = ROOT / "dashboards" / "alerts.yaml"
#: Rules written with Triton's metric names only, as a Triton operator has them.
TRITON_RULES = ROOT / "tests" / "python" / "triton_rules.yaml"

# Every family the issue names; GPU families only exist where NVML sees a GPU,
# cgroup throttling only where the cgroup reports it: required then (OPTIONAL).
FAMILIES = [
    "splitserve_requests_total",
    "splitserve_request_duration_seconds_bucket",
    "splitserve_queue_duration_seconds_bucket",
    "splitserve_inference_duration_seconds_bucket",
    "splitserve_batch_size_bucket",
    "splitserve_inflight_requests",
    "splitserve_rejected_requests_total",
    "splitserve_queue_depth",
    "splitserve_queue_capacity",
    "splitserve_threads",
    "splitserve_cpu_budget_cores",
    "splitserve_workers",
    "splitserve_context_switches_total",
    "splitserve_build_info",
    "splitserve_activations_stored",
    "splitserve_training_events_total",
    "splitserve_open_connections",
    "splitserve_connections_total",
    "splitserve_limit_rejections_total",
    "splitserve_auth_failures_total",
    "splitserve_model_info",
    "splitserve_request_bytes_bucket",
    "splitserve_response_bytes_bucket",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
]
#: Families the dashboard shows before the binary exports them (none now):
#: while /metrics lacks one, the panels that read it may be empty.
PLANNED: list[str] = []
OPTIONAL = {
    "cgroup": ["splitserve_cgroup_cpu_throttled_seconds_total", "splitserve_cgroup_cpu_throttled_periods_total"],
    "gpu": ["splitserve_gpu_memory_used_bytes", "splitserve_gpu_memory_total_bytes", "splitserve_gpu_utilization_ratio"],
}


def cgroup_cpu_stat_files(pid: int) -> list[Path]:
    """The cpu.stat files that report a process's CPU throttling, found the way
    the kernel documents it (independently of the server's own search): the
    cgroup v2 hierarchy and cgroup v1's cpu controller, wherever /proc/PID/mountinfo
    says they are mounted, at the process's cgroup and at the mount's root; and
    /sys/fs/cgroup/cpu.stat."""
    mounts = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, (fstype, _source, options) = before.split(), after.split()[:3]
        mounts.append((fields[3], fields[4], fstype, set(options.split(","))))
    files = [Path("/sys/fs/cgroup/cpu.stat")]
    for entry in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = entry.split(":", 2)
        v2 = hierarchy == "0" and controllers == ""
        for root, point, fstype, options in mounts:
            if (v2 and fstype == "cgroup2") or (
                    not v2 and fstype == "cgroup" and "cpu" in controllers.split(",") and "cpu" in options):
                rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
                files += [Path(point) / rel / "cpu.stat", Path(point) / "cpu.stat"]
    return [f for f in dict.fromkeys(files) if f.is_file()]


def throttled_periods(pid: int) -> dict[Path, int]:
    """nr_throttled of every cpu.stat that reports it (empty: the cgroup reports no throttling)."""
    found = {}
    for f in cgroup_cpu_stat_files(pid):
        m = re.search(r"^nr_throttled (\d+)$", f.read_text(), re.M)
        if m:
            found[f] = int(m.group(1))
    return found


def tool(name):
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} is missing: run scripts/setup-deploy-tools.sh (make test does)"
    return path


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Prometheus:
    def __init__(self, tmp: Path, *targets: str):
        """Scrapes each target as pod splitserve-<index> in namespace test, job
        splitserve (the job the alerts expect)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS), str(TRITON_RULES)],
            "scrape_configs": [{
                "job_name": "splitserve",
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": "test", "pod": f"splitserve-{i}"}}
                    for i, target in enumerate(targets)
                ],
            }],
        }
        cfg = tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    def query(self, expr, at=None):
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_ready(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                http_get(f"{self.url}/-/ready")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus never became ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def bench(addr, seconds, *extra):
    return subprocess.Popen(
        [str(BIN), "bench", "--addr", addr, "--duration", f"{seconds}s", "--warmup", "0s", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


#: What the stack fixture waits for before the tests read Prometheus: enough
#: scrapes for rate() over the dashboard's window, forwards of both models in
#: that window, and the events it provokes.
STACK_READY = [
    ('min(count_over_time(splitserve_cpu_budget_cores[30s]))', lambda v: v >= 8),
    ('min(count_over_time(splitserve_requests_total{code="OK"}[30s]))', lambda v: v >= 8),
    ('count(sum by (model) (rate(splitserve_batch_size_count{model=~"mlp|slow"}[15s])) > 0)', lambda v: v == 2),
    ('count(splitserve_requests_total{code="INTERNAL"})', lambda v: v >= 1),
    ('count(splitserve_limit_rejections_total{limit="forward_id"} > 0)', lambda v: v >= 1),
    ('count(splitserve_auth_failures_total{reason="unauthenticated"} > 0)', lambda v: v >= 1),
]


def provoke_events(pb, s, guarded):
    """Once each: an INTERNAL answer (a model whose output Compute cannot send),
    a limit (an oversized forward_id) and a refused token, so that the panels and
    alerts that read them have series."""
    pb2, pb2_grpc = pb
    x = np.ones((1, 4), dtype=np.float32)
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 4], model_id="pair"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL, e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ComputeBackward(pb2.BackwardRequest(
            grad_output_data=x.tobytes(), grad_output_shape=[1, 4], forward_id="f" * 4096), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    guarded_stub = pb2_grpc.ComputeServiceStub(guarded.channel())
    with pytest.raises(grpc.RpcError) as e:
        guarded_stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 4]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()


@pytest.fixture(scope="module")
def stack(pb, tmp_path_factory):
    """A live splitserve under mixed load, scraped every second by Prometheus as
    pod splitserve-0, beside a second one with token authentication (pod
    splitserve-1, no load). Yields (server, prometheus, loaded_at): loaded_at is
    a moment when every STACK_READY condition held, the load running."""
    s = Server(
        "--model", "mlp=builtin:mlp:16x32x8",
        "--model", "slow=builtin:delay:20",
        "--model", f"pair={fixture_path('pair.pt')}",
        "--max-batch-size", "mlp=8", "--batch-timeout-us", "mlp=500",
        "--queue-capacity", "64",
    )
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{secrets.token_hex(16)} infer\n")
    guarded = Server("--model", "m=builtin:scale:2", "--auth-token-file", str(tokens))
    s.wait_ok(pb)
    guarded.wait_serving()
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"),
                      f"127.0.0.1:{s.metrics_port}", f"127.0.0.1:{guarded.metrics_port}")
    prom.wait_ready()
    load = [
        bench(s.addr, 40, "--model-id", "mlp", "--shape", "1x16", "--concurrency", "8"),
        bench(s.addr, 40, "--model-id", "slow", "--shape", "1x4", "--concurrency", "4"),
        # Wrong width for the MLP: rejected as invalid, visible as INVALID_ARGUMENT.
        bench(s.addr, 40, "--model-id", "mlp", "--shape", "1x5", "--concurrency", "1"),
    ]
    provoke_events(pb, s, guarded)
    loaded_at, pending = None, STACK_READY
    deadline = time.time() + 60
    while time.time() < deadline:
        now = time.time()
        pending = [(q, ok) for q, ok in STACK_READY
                   if not ((r := prom.query(q, at=now)) and ok(float(r[0]["value"][1])))]
        if not pending:
            loaded_at = now
            break
        time.sleep(0.5)
    try:
        assert loaded_at is not None, f"Prometheus never saw: {[q for q, _ in pending]}"
        # The two loads that succeed (the third one's requests all fail).
        assert all(p.poll() is None for p in load[:2]), "the load ended before Prometheus had its data"
        yield s, prom, loaded_at
    finally:
        for p in load:
            p.kill()
            p.wait()
        prom.stop()
        assert guarded.terminate() == 0
        assert s.terminate() == 0


def test_promtool_accepts_the_live_exposition(stack):
    s, _, _ = stack
    text = http_get(f"{s.metrics_url}/metrics")
    # Triton's families keep Triton's names, which promtool's naming lint
    # dislikes (counters without _total, "_us"): only that, and only for them.
    ours = "".join(line + "\n" for line in text.splitlines() if " nv_" not in line and not line.startswith("nv_"))
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=ours, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    naming = ('should have "_total" suffix', "should not contain abbreviated units",
              'should not have "_count" suffix')
    complaints = [c for c in (r.stdout + r.stderr).splitlines() if c.strip()]
    assert complaints and all(c.startswith("nv_") and c.endswith(naming) for c in complaints), complaints


def test_prometheus_has_data_for_every_family(stack):
    s, prom, _ = stack
    before = throttled_periods(s.proc.pid)
    exposed = http_get(f"{s.metrics_url}/metrics")
    after = throttled_periods(s.proc.pid)
    wanted = list(FAMILIES)
    # Required wherever the machine reports them: the cgroup's throttling where a
    # cpu.stat has nr_throttled, the NVML series where there is a GPU.
    if before:
        wanted += OPTIONAL["cgroup"]
        periods = metric_value(exposed, "splitserve_cgroup_cpu_throttled_periods_total")
        assert periods is not None, f"{sorted(map(str, before))} report throttling, /metrics does not"
        # The exposition reads the cgroup's own counter at scrape time.
        assert any(before[f] <= periods <= after.get(f, before[f]) for f in before), (before, periods, after)
    if cuda_available():
        wanted += OPTIONAL["gpu"]
    missing = [f for f in wanted if not prom.query(f'{f}{{namespace="test"}}')]
    assert missing == [], f"no data in Prometheus for {missing}"
    codes = {r["metric"]["code"] for r in prom.query("splitserve_requests_total")}
    assert {"OK", "INVALID_ARGUMENT"} <= codes, codes
    reasons = prom.query('splitserve_rejected_requests_total{reason="invalid"} > 0')
    assert reasons, "invalid requests are counted as rejections"
    batched = prom.query('max(splitserve_batch_size_bucket{model="mlp", le="1"}) < max(splitserve_batch_size_count{model="mlp"})')
    assert batched, "some MLP forwards carried more than one request"
    assert prom.query('splitserve_requests_total{model="pair", code="INTERNAL"} > 0')


def dashboard_panels():
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_exprs():
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target["expr"]


def substitute(expr, model=".*"):
    for var, value in {"$namespace": "test", "$pod": "splitserve-.*", "$model": model,
                       "$__rate_interval": "15s", "$__interval": "5s", "$__range": "1m"}.items():
        expr = expr.replace("${" + var[1:] + "}", value).replace(var, value)
    return expr


def test_every_dashboard_panel_returns_data(stack):
    s, prom, loaded_at = stack
    gpu = cuda_available()  # then the GPU panels and alerts must have data
    exposed = http_get(f"{s.metrics_url}/metrics")
    not_yet = [f for f in PLANNED if f"\n{f}" not in exposed]
    empty = []
    for title, expr in dashboard_exprs():
        if "GPU" in title and not gpu:
            continue
        if any(f in expr for f in not_yet):
            continue
        if not prom.query(substitute(expr), at=loaded_at):
            empty.append((title, expr))
    assert empty == [], f"empty panels: {empty}"


def panel_values(prom, title, model, at):
    """refId -> [value of each series] of a panel's queries for one model."""
    (panel,) = [p for p in dashboard_panels() if p["title"] == title]
    return {t["refId"]: [float(r["value"][1]) for r in prom.query(substitute(t["expr"], model), at=at)]
            for t in panel["targets"]}


def test_batch_size_panel_reads_what_happened(stack):
    """With batching off every forward carries one request: the panel reads
    exactly 1 (and no forward batched), not an interpolated 0.5 or 0.99. The MLP
    batches under 8 concurrent clients: its mean is above 1."""
    _, prom, loaded_at = stack
    off = panel_values(prom, "Batch size", "slow", loaded_at)
    assert len(off["A"]) == 1 and math.isclose(off["A"][0], 1.0, rel_tol=0, abs_tol=1e-9), off
    assert len(off["B"]) == 1 and math.isclose(off["B"][0], 0.0, rel_tol=0, abs_tol=1e-9), off
    on = panel_values(prom, "Batch size", "mlp", loaded_at)
    assert len(on["A"]) == 1 and 1.0 < on["A"][0] <= 8.0, on
    assert len(on["B"]) == 1 and 0.0 < on["B"][0] <= 1.0, on


def alert_rules():
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                yield rule["alert"], rule["expr"]


def compared_sides(expr):
    """The operands of the top-level comparisons of a PromQL expression (numbers
    dropped), e.g. `a / b > 0.8` -> [`a / b`], `a > on (x) b` -> [`a`, `b`]."""
    depth, start, sides, i = 0, 0, [], 0
    while i < len(expr):
        c = expr[i]
        depth += c in "([{"
        depth -= c in ")]}"
        op = re.match(r"(>=|<=|==|!=|>|<)", expr[i:]) if depth == 0 else None
        if op:
            sides.append(expr[start:i])
            i += len(op.group(0))
            rest = re.match(r"\s*(bool\s*)?((on|ignoring)\s*\([^)]*\)\s*)?((group_left|group_right)\s*(\([^)]*\))?\s*)?", expr[i:])
            i += rest.end()
            start = i
            continue
        i += 1
    sides.append(expr[start:])
    return [x.strip() for x in sides if x.strip() and not re.fullmatch(r"[-+0-9.e]+", x.strip())]


def test_every_alert_expression_reads_live_series(stack):
    _, prom, loaded_at = stack
    gpu = cuda_available()  # then the GPU panels and alerts must have data
    problems = []
    for name, expr in alert_rules():
        # The comparison makes an alert empty while healthy: evaluate what it compares.
        for side in compared_sides(expr):
            if "gpu" in side and not gpu:
                continue
            if "kube_" in side:
                continue  # kube-state-metrics: not part of this stack
            if not prom.query(side, at=loaded_at):
                problems.append((name, side))
    assert problems == [], f"alert expressions with no data: {problems}"
    # Prometheus itself evaluates every rule without error.
    rules = json.loads(http_get(f"{prom.url}/api/v1/rules"))["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") != "ok"]
    assert bad == [] and sum(len(g["rules"]) for g in rules if g["file"] == str(ALERTS)) == len(list(alert_rules()))
    # Both pods are scraped: the target-down alert reads 1 for each.
    assert {r["metric"]["pod"]: r["value"][1] for r in prom.query('up{job="splitserve"}')} == {
        "splitserve-0": "1", "splitserve-1": "1"}


def test_a_slow_model_builds_a_queue_and_threads_stay_flat(pb, server_factory):
    s = server_factory("--model", "slow=builtin:delay:50", "--workers", "1", "--intra-op-threads", "1")
    s.wait_ok(pb)

    def scrape(name):
        text = http_get(f"{s.metrics_url}/metrics")
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not exposed")

    threads_idle = scrape('splitserve_threads{pool="process"}')
    assert scrape('splitserve_queue_depth{model="slow"}') == 0
    load = bench(s.addr, 4, "--shape", "1", "--concurrency", "16", "--connections", "4")
    depth, threads, inflight = [], [], []

    def queue_built():
        # 16 clients, 1 worker: 15 wait. Threads are sampled all along.
        depth.append(scrape('splitserve_queue_depth{model="slow"}'))
        threads.append(scrape('splitserve_threads{pool="process"}'))
        inflight.append(scrape("splitserve_inflight_requests"))
        return max(depth) >= 10 and max(inflight) >= 15

    wait_until(queue_built, 30, "a queue of 10 and 15 requests in flight", every=0.05)
    while load.poll() is None:
        threads.append(scrape('splitserve_threads{pool="process"}'))
        time.sleep(0.05)
    assert load.returncode == 0, load.stderr.read()
    assert max(threads) == threads_idle, (threads_idle, threads)   # no thread per request
    wait_until(lambda: scrape('splitserve_workers{state="busy"}') == 0, 10, "the worker to go idle")
    wait_until(lambda: scrape('splitserve_queue_depth{model="slow"}') == 0, 10, "the queue to empty")
    wait_until(lambda: scrape("splitserve_inflight_requests") == 0, 10, "no request in flight")


def test_triton_dashboard_queries_and_rules_evaluate_over_splitserve(stack):
    """A Triton operator's dashboard queries and alert rules, unchanged, on
    splitserve's /metrics: they have data, agree with splitserve's own
    families, and the failure alert fires for the model that fails."""
    _, prom, loaded_at = stack

    def by_model(expr):
        return {r["metric"].get("model"): float(r["value"][1]) for r in prom.query(expr, at=loaded_at)}

    throughput = by_model('sum by (model) (rate(nv_inference_request_success{namespace="test"}[15s]))')
    assert throughput.get("mlp", 0) > 0 and throughput.get("slow", 0) > 0, throughput
    queue_us = by_model('sum by (model) (rate(nv_inference_queue_duration_us[15s]))'
                        ' / sum by (model) (rate(nv_inference_request_success[15s]))')
    assert all(math.isfinite(v) and v >= 0 for m, v in queue_us.items() if m in ("mlp", "slow")), queue_us
    assert {"mlp", "slow"} <= set(queue_us), queue_us
    # The slow model's requests each spend its 20 ms in compute.
    infer_us = by_model('sum by (model) (rate(nv_inference_compute_infer_duration_us[15s]))'
                        ' / sum by (model) (rate(nv_inference_request_success[15s]))')
    assert infer_us["slow"] >= 19_000, infer_us
    # Same scrape, same facts: Triton's counters are splitserve's, by another name.
    for triton, ours in [("nv_inference_request_success", "splitserve_computed_requests_total"),
                         ("nv_inference_exec_count", "splitserve_forwards_total")]:
        diff = by_model(f'sum by (model) ({triton}{{pod="splitserve-0"}})'
                        f' - sum by (model) ({ours}{{pod="splitserve-0"}})')
        assert diff and all(v == 0 for v in diff.values()), (triton, diff)
    assert by_model('sum by (model) (nv_inference_exec_count{model="mlp"})'
                    ' < sum by (model) (nv_inference_count{model="mlp"})'), "the MLP's batches hold several inferences"
    assert prom.query('nv_inference_pending_request_count{model="slow", version="1"}', at=loaded_at)
    # Prometheus evaluates the Triton rules without error; the MLP, whose
    # wrong-width requests fail in its forward, trips the failure alert.
    groups = json.loads(http_get(f"{prom.url}/api/v1/rules"))["data"]["groups"]
    triton = [r for g in groups if g["file"] == str(TRITON_RULES) for r in g["rules"]]
    assert len(triton) == 6 and all(r["health"] == "ok" for r in triton), triton
    firing = wait_until(lambda: prom.query('ALERTS{alertname="TritonInferenceFailures", model="mlp"}'),
                        30, "the Triton failure alert for mlp")
    assert firing[0]["metric"]["version"] == "1"
    assert not prom.query('ALERTS{alertname="TritonInferenceFailures", model="slow"}')


"""The operator tools: `splitserve bench`, `diagnose` and `probe` against real servers."""

import json
import subprocess

import pytest

from conftest import BIN, CLIENT, ROOT, http_status


def run(*args, timeout=120):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def test_bench_reports_throughput_latency_and_errors_by_code(pb, server_factory):
    # A model whose cost is known: 20 ms per forward on each of 2 workers, so 4
    # clients wait about 40 ms per request and at most 100 requests/s get through.
    s = server_factory("--model", "k=builtin:delay:20", "--workers", "2", "--intra-op-threads", "1",
                       "--device", "cpu")
    s.wait_ok(pb)
    before = s.metric("splitserve_requests_total", model="k", code="OK") or 0
    r = run("bench", "--addr", s.addr, "--concurrency", "4", "--connections", "2",
            "--duration", "1s", "--warmup", "200ms", "--shape", "2x8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] > 0 and report["errors"] == {}
    assert (report["concurrency"], report["connections"], report["shape"]) == (4, 2, [2, 8]), report
    # Throughput is what was answered in the measured second, and no more than the workers allow.
    assert report["throughput_rps"] == pytest.approx(report["ok"] / report["duration_s"], rel=0.05), report
    assert report["throughput_rps"] <= 2 * 1000 / 20 * 1.05, report
    lat = report["latency_ms"]
    # No request is answered faster than its forward; queueing behind the others doubles it.
    assert 20 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert lat["p50"] >= 30, lat
    assert lat["p50"] <= lat["mean"] * 1.5 and lat["mean"] <= lat["max"], lat
    # The server answered at least what bench counted (plus the warm-up).
    after = s.metric("splitserve_requests_total", model="k", code="OK")
    assert after - before >= report["ok"], (before, after, report["ok"])

    r = run("bench", "--addr", s.addr, "--concurrency", "2", "--duration", "500ms",
            "--warmup", "0s", "--model-id", "missing", "--json")
    report = json.loads(r.stdout)
    assert report["ok"] == 0 and report["errors"].get("NotFound", 0) > 0
    assert r.returncode == 1, "every request failed: above --max-error-rate 0"

    r = run("bench", "--addr", s.addr, "--duration", "500ms", "--warmup", "0s", "--concurrency", "2")
    assert "throughput" in r.stdout and "p99" in r.stdout


def test_the_client_binary_probes_and_benches_without_libtorch(pb, server_factory):
    """What the HEALTHCHECK and the Helm test run: no libtorch, a few MB."""
    ldd = subprocess.run(["ldd", str(CLIENT)], capture_output=True, text=True).stdout
    assert "libtorch" not in ldd and "libc10" not in ldd, ldd
    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    # GNU time reports the probe's own peak RSS (KiB) on stderr.
    r = subprocess.run(["/usr/bin/time", "-f", "peak_kib=%M", str(CLIENT), "probe", "--addr", s.addr],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    peak_kib = int(r.stderr.rsplit("peak_kib=", 1)[1].split()[0])
    assert peak_kib < 30 * 1024, f"probe peaked at {peak_kib} KiB"
    r = subprocess.run([str(CLIENT), "probe", "--addr", s.addr, "--service", "no.such.Service"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    r = subprocess.run([str(CLIENT), "bench", "--addr", s.addr, "--duration", "300ms", "--warmup", "0s",
                        "--shape", "2x8", "--concurrency", "2", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] > 0


def test_probe_exit_codes(pb, server_factory):
    """0 only for SERVING; NOT_SERVING (loading, draining, a stalled worker) is
    covered with both probe commands in test_lifecycle.py and test_threads.py."""
    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    r = run("probe", "--addr", s.addr)
    assert r.returncode == 0 and r.stdout.strip() == f'{s.addr} "splitlearn.comm.ComputeService": SERVING', r
    r = run("probe", "--addr", s.addr, "--service", "liveness")
    assert r.returncode == 0 and r.stdout.strip() == f'{s.addr} "liveness": SERVING', r
    r = run("probe", "--addr", s.addr, "--service", "no.such.Service")
    assert r.returncode == 1 and "NotFound" in r.stderr, r
    assert s.terminate() == 0
    r = run("probe", "--addr", s.addr, "--timeout", "500ms")
    assert r.returncode == 1 and "cannot connect" in r.stderr
    # The cause, not only "transport error".
    assert "Connection refused" in r.stderr and "is the server running" in r.stderr, r.stderr


def test_diagnose_measures_plans_and_recommends_one_within_budget():
    r = run("diagnose", "--model", "builtin:mlp:16x32x8", "--shape", "1x16", "--duration", "150ms",
            "--concurrency", "4", "--plans", "1x1,2x1,8x2", "--cpu-limit", "2", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["budget"]["cores"] <= 2
    assert d["torch"]["version"].startswith("2.13.0")
    assert "OMP_NUM_THREADS" in d["env"]
    assert [(x["workers"], x["intra_op_threads"]) for x in d["libtorch_alone"]] == [(1, 1), (2, 1), (8, 2)]
    assert d["grpc_alone"]["throughput_rps"] > 0
    together = {(x["workers"], x["intra_op_threads"]): x for x in d["together"]}
    assert together[(8, 2)]["oversubscribed"] and not together[(1, 1)]["oversubscribed"]
    assert all(x["throughput_rps"] > 0 and x["threads"] > 0 for x in d["together"])
    rec = d["recommendation"]
    assert rec and rec["workers"] * rec["intra_op_threads"] <= d["budget"]["cores"]
    w, t = rec["workers"], rec["intra_op_threads"]
    assert rec["env"] == f"SPLITSERVE_WORKERS={w} SPLITSERVE_INTRA_OP_THREADS={t}"
    assert f"config.workers={w}" in rec["helm"]
    assert rec["is_auto"] == (w == d["budget"]["cores"] and t == 1)
    # splitserve sets libtorch's threads itself: no warning about OMP_NUM_THREADS.
    assert not any("OMP_NUM_THREADS" in warning for warning in d["warnings"])
    # libtorch alone is timed finer than whole microseconds.
    assert len({x["p50_ms"] for x in d["libtorch_alone"]}) > 1 or d["libtorch_alone"][0]["p50_ms"] * 1000 % 1 != 0

    # Repeated runs report their spread, and either a plan or why not.
    r = run("diagnose", "--model", "builtin:mlp:16x32x8", "--shape", "1x16", "--duration", "100ms",
            "--concurrency", "2", "--plans", "1x1,2x1", "--cpu-limit", "2", "--repeats", "2", "--json")
    d = json.loads(r.stdout)
    assert all(x["runs"] == 2 and x["throughput_min"] <= x["throughput_rps"] <= x["throughput_max"]
               for x in d["together"])
    assert (d["recommendation"] is None) != (d["no_recommendation"] is None)

    human = run("diagnose", "--model", "builtin:scale:1", "--shape", "4", "--duration", "100ms",
                "--concurrency", "2", "--plans", "1x1", "--repeats", "1")
    assert human.returncode == 0 and "recommended" in human.stdout and "CPU budget" in human.stdout


def _rendered_chart(values):
    """Every object `helm template` renders for values (the chart's own renderer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_deploy", ROOT / "scripts" / "render_deploy.py")
    rd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rd)
    return [(o, rd.is_hook(o)) for _, o in rd.manifests(rd.render_chart(values, name="splitserve", namespace="ml"))]


def _chain_to_the_container(objs, host, port, port_name):
    """host:port, as the test pod dials it, reaches the server container's port_name
    port, on which the container's SPLITSERVE_* address listens."""
    (svc,) = [o for o, hook in objs if o["kind"] == "Service" and o["metadata"]["name"] == host]
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert svc_port["targetPort"] == port_name, svc_port
    (dep,) = [o for o, hook in objs if o["kind"] == "Deployment"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "splitserve"]
    (cport,) = [p["containerPort"] for p in c["ports"] if p["name"] == port_name]
    env = {e["name"]: e.get("value") for e in c["env"]}
    return cport, env


def test_the_helm_test_pod_passes_against_a_ready_server_and_fails_otherwise(pb, server_factory):
    """`helm test`'s pod, rendered from the chart and run here with the Service's
    address replaced by a local server's: no cluster is involved, so this checks
    the command and where it points, not a Kubernetes run of `helm test`."""
    import yaml

    objs = _rendered_chart({})
    (pod,) = [o for o, hook in objs if hook and o["kind"] == "Pod"]
    (c,) = pod["spec"]["containers"]
    command = c["command"] + c.get("args", [])
    assert command[:3] == ["splitserve-client", "probe", "--addr"], command
    host, port = command[3].rsplit(":", 1)
    cport, env = _chain_to_the_container(objs, host, int(port), "grpc")
    assert env["SPLITSERVE_GRPC_ADDR"] == f"0.0.0.0:{cport}", env

    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    local = [str(CLIENT.parent / command[0]), *command[1:3], s.addr, *command[4:]]
    r = subprocess.run(local, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip().endswith('"splitlearn.comm.ComputeService": SERVING'), r
    assert s.terminate() == 0
    r = subprocess.run(local, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r

    # With TLS on, the pod asks the admin port's /readyz over plain HTTP instead.
    tls = yaml.safe_load((ROOT / "tests" / "deploy" / "values-all.yaml").read_text())
    assert tls["tls"]["enabled"]
    objs = _rendered_chart(tls)
    (pod,) = [o for o, hook in objs if hook and o["kind"] == "Pod"]
    (c,) = pod["spec"]["containers"]
    assert c["command"][0] == "wget", c["command"]
    url = c["command"][-1]
    assert url.startswith("http://") and url.endswith("/readyz"), url
    host, port = url.removeprefix("http://").removesuffix("/readyz").rsplit(":", 1)
    cport, env = _chain_to_the_container(objs, host, int(port), "metrics")
    assert env["SPLITSERVE_METRICS_ADDR"] == f"0.0.0.0:{cport}", env
    assert not any(k.startswith("SPLITSERVE_ADMIN_TLS") for k in env), "the admin port would not speak plain HTTP"
    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    assert http_status(f"{s.metrics_url}/readyz") == (200, "ready\n")
    assert s.terminate() == 0

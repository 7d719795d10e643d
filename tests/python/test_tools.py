"""The operator tools: `splitserve bench`, `diagnose` and `probe` against real servers."""

import json
import subprocess

from conftest import BIN


def run(*args, timeout=120):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def test_bench_reports_throughput_latency_and_errors_by_code(pb, server_factory):
    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    r = run("bench", "--addr", s.addr, "--concurrency", "4", "--connections", "2",
            "--duration", "1s", "--warmup", "200ms", "--shape", "2x8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] > 0 and report["errors"] == {}
    assert report["throughput_rps"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]

    r = run("bench", "--addr", s.addr, "--concurrency", "2", "--duration", "500ms",
            "--warmup", "0s", "--model-id", "missing", "--json")
    report = json.loads(r.stdout)
    assert report["ok"] == 0 and report["errors"].get("NotFound", 0) > 0

    r = run("bench", "--addr", s.addr, "--duration", "500ms", "--warmup", "0s", "--concurrency", "2")
    assert "throughput" in r.stdout and "p99" in r.stdout


CLIENT = BIN.parent / "splitserve-client"


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
    s = server_factory("--model", "k=builtin:scale:2")
    s.wait_ok(pb)
    assert run("probe", "--addr", s.addr).returncode == 0
    assert run("probe", "--addr", s.addr, "--service", "liveness").returncode == 0
    r = run("probe", "--addr", s.addr, "--service", "no.such.Service")
    assert r.returncode == 1
    s.terminate()
    r = run("probe", "--addr", s.addr, "--timeout", "500ms")
    assert r.returncode == 1 and "cannot connect" in r.stderr


def test_diagnose_measures_plans_and_recommends_one_within_budget():
    r = run("diagnose", "--model", "builtin:mlp:16x32x8", "--shape", "1x16", "--duration", "300ms",
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
    r = run("diagnose", "--model", "builtin:mlp:16x32x8", "--shape", "1x16", "--duration", "200ms",
            "--concurrency", "2", "--plans", "1x1,2x1", "--cpu-limit", "2", "--repeats", "3", "--json")
    d = json.loads(r.stdout)
    assert all(x["runs"] == 3 and x["throughput_min"] <= x["throughput_rps"] <= x["throughput_max"]
               for x in d["together"])
    assert (d["recommendation"] is None) != (d["no_recommendation"] is None)

    human = run("diagnose", "--model", "builtin:scale:1", "--shape", "4", "--duration", "200ms",
                "--concurrency", "2", "--plans", "1x1", "--repeats", "1")
    assert human.returncode == 0 and "recommended" in human.stdout and "CPU budget" in human.stdout

"""What operators see is true: the tools' exit codes and messages, logs
without escape codes, units Kubernetes users write, an access log, the
version, and the metrics dashboards read."""

import json
import subprocess
import urllib.request

from conftest import BIN, fixture_path


def run(*args, timeout=120, **kw):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout, **kw)


def scrape(server) -> str:
    return urllib.request.urlopen(server.metrics_url + "/metrics", timeout=5).read().decode()


def test_bench_names_each_error_and_fails_when_requests_fail(pb, server_factory):
    s = server_factory()  # the default 512-wide MLP
    s.wait_ok(pb)
    r = run("bench", "--addr", s.addr, "--duration", "500ms", "--warmup", "0s",
            "--concurrency", "2", "--shape", "1x100")
    assert r.returncode != 0, r.stdout
    assert "2 clients on 2 connections" in r.stdout, r.stdout  # never more connections than clients
    assert "100.0% of requests failed" in r.stdout
    assert "expects [-1, 512]" in r.stdout, r.stdout
    assert "--max-error-rate" in r.stderr
    # Tolerated failures: exit 0 again.
    r = run("bench", "--addr", s.addr, "--duration", "300ms", "--warmup", "0s",
            "--concurrency", "1", "--shape", "1x100", "--max-error-rate", "1", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["error_rate"] == 1.0
    assert any("InvalidArgument" in k for k in report["error_messages"])


def test_version_says_what_it_was_built_from():
    out = run("--version").stdout
    assert "libtorch 2.13.0" in out and "CUDA " in out and "commit " in out, out


def test_units_host_names_and_turning_ports_off(pb, server_factory, tmp_path):
    # Kubernetes writes sizes and CPUs like this; a host name resolves.
    s = server_factory("--activation-cache-bytes", "2GiB", "--max-message-bytes", "64Mi",
                       "--cpu-limit", "1000m")
    s.wait_ok(pb)
    info = pb[1].ComputeServiceStub(s.channel()).GetServiceInfo(pb[0].ServiceInfoRequest()).custom_info
    assert info["activation_cache_bytes"] == str(2 << 30)
    assert info["max_message_bytes"] == str(64 << 20)
    assert info["cpu_budget"] == "1"
    assert s.terminate() == 0
    # A bad unit is a configuration error naming the value.
    r = run("serve", "--activation-cache-bytes", "2 parsecs", "--grpc-addr", "localhost:0",
            "--metrics-addr", "off", "--http-addr", "off")
    assert r.returncode == 2 and "2 parsecs" in r.stderr, r.stderr


def test_text_logs_carry_no_escape_codes_into_a_pipe_and_the_access_log_has_each_request(pb, server_factory):
    s = server_factory("--access-log")
    s.wait_ok(pb)
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    stub.Compute(pb2.ComputeRequest(data=b"\0" * 2048, shape=[1, 512]), timeout=30)
    # A rejected request's line says why, with the shape it sent (runbooks.md, `invalid`).
    try:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 400, shape=[1, 100]), timeout=30)
    except Exception:
        pass
    assert s.terminate() == 0
    log = s.output()
    assert "\x1b[" not in log
    lines = [l for l in log.splitlines() if "splitserve::access" in l and 'method="Compute"' in l]
    assert len(lines) == 2, log[-2000:]
    assert 'code="OK"' in lines[0] and "bytes_in=2048" in lines[0] and "bytes_out=2048" in lines[0]
    assert 'model="mlp"' in lines[0] and "duration_ms=" in lines[0] and "error=" not in lines[0]
    assert 'code="INVALID_ARGUMENT"' in lines[1] and "error=" in lines[1] and "[1, 100]" in lines[1], lines[1]
    # Durations in whole microseconds, no float noise (0.030994999999999998).
    for line in lines:
        duration = line.split("duration_ms=")[1].split()[0]
        assert len(duration.partition(".")[2]) <= 3, line


def test_a_file_that_is_not_torchscript_says_how_to_fix_it(tmp_path):
    import torch

    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    r = run("serve", "--model", f"m={pickled}", "--grpc-addr", "127.0.0.1:0",
            "--metrics-addr", "off", "--http-addr", "off")
    assert r.returncode != 0
    assert "not TorchScript" in r.stderr and "torch.jit.script" in r.stderr, r.stderr[-1500:]


def test_dashboards_find_model_info_payload_sizes_and_training_by_model(pb, server_factory):
    s = server_factory("--model", f"top={fixture_path('top.pt')}", "--trainable", "top")
    s.wait_ok(pb)
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    reply = stub.Compute(pb2.ComputeRequest(data=b"\0" * 64, shape=[2, 8], training_mode=True), timeout=30)
    stub.ComputeBackward(pb2.BackwardRequest(grad_output_data=b"\0" * len(reply.data),
                                             grad_output_shape=list(reply.shape),
                                             forward_id=reply.forward_id), timeout=30)
    text = scrape(s)
    info = [l for l in text.splitlines() if l.startswith("splitserve_model_info{")]
    assert len(info) == 1 and 'model="top"' in info[0] and 'digest="sha256:' in info[0], info
    assert 'splitserve_request_bytes_count{encoding="float32",protocol="splitlearn"}' in text
    assert 'splitserve_training_events_total{event="backward",model="top"} 1' in text
    assert s.terminate() == 0


def test_a_failed_warm_up_names_the_file_once():
    """The operator's error: the model's path (not its digest), printed once."""
    top = fixture_path("top.pt")
    r = run("serve", "--model", f"top={top}", "--warmup-shape", "top=1x5", "--grpc-addr", "127.0.0.1:0",
            "--metrics-addr", "off", "--http-addr", "off")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "warm-up forward" in line]
    assert len(errors) == 1, r.stderr[-3000:]
    assert str(top) in errors[0] and "sha256" not in errors[0], errors[0]

"""Start-up, readiness and drain (SIGTERM, SIGINT, a grace that runs out) of the
real binary, seen by real grpc.health.v1 and ComputeService clients, the probe
commands and the admin port's /readyz."""

import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BIN, CLIENT, http_status, probe, wait_until

SERVICE = "splitlearn.comm.ComputeService"
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
#: What a request gets while the server drains: UNAVAILABLE with this message,
#: never just the UNAVAILABLE of a closed listener.
DRAINING = "the server is shutting down and accepts no new requests"
LOADING = "models are still loading; retry shortly"


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def refused(stub, pb2, shape=(1, 4)):
    """(code, details) of a Compute the server must refuse."""
    n = int(np.prod(shape))
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 4 * n, shape=list(shape)), timeout=5)
    return e.value.code(), e.value.details()


def http_post(url: str, body: bytes) -> tuple[int, str]:
    """(HTTP status, body) of a JSON POST, error statuses included."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def assert_probes(addr, service, serving: bool):
    """Both probe commands (the container HEALTHCHECK and the Helm test run them)
    exit 0 when `service` is SERVING and 1, saying NOT_SERVING, when it is not."""
    for binary in (BIN, CLIENT):
        r = probe(binary, addr, "--service", service)
        if serving:
            assert r.returncode == 0 and r.stdout.strip().endswith(": SERVING"), (binary.name, r)
        else:
            assert r.returncode == 1 and r.stdout.strip().endswith(": NOT_SERVING"), (binary.name, r)


def send_all(stub, pb2, n):
    """n requests of distinct values, each on its own thread; returns (threads, results, errors)."""
    results, errors = [], []

    def call(i):
        x = np.full((1, 4), i, dtype=np.float32)
        try:
            r = stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 4], request_id=i), timeout=60)
            results.append((i, np.frombuffer(r.data, dtype=np.float32).tolist()))
        except grpc.RpcError as err:
            errors.append((i, err.code(), err.details()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def wait_held(stub, pb2, n, queued=None):
    """Every one of n requests has reached the server (queued, running or done)."""
    def held():
        info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
        total = int(info["queue_depth"]) + int(info["workers_busy"]) + int(info["requests_computed"])
        return total >= n and (queued is None or int(info["queue_depth"]) == queued)
    wait_until(held, 30, f"{n} requests to reach the server")


def test_health_follows_startup_serving_and_drain(pb, server_factory):
    pb2, pb2_grpc = pb
    # The delay model's warm-up forward sleeps 6 s: the server is loading that long.
    s = server_factory(
        "--model", "slow=builtin:delay:400",
        "--model", "warm=builtin:delay:6000",
        "--warmup-shape", "warm=1",
        "--workers", "2", "--intra-op-threads", "1",
    )
    s.wait_listening()
    ch = s.channel()
    stub = pb2_grpc.ComputeServiceStub(ch)

    # Loading: not ready by any measure, but live.
    assert health(ch, "") == NOT_SERVING
    assert health(ch, SERVICE) == NOT_SERVING
    assert health(ch, "liveness") == SERVING
    h = stub.HealthCheck(pb2.HealthRequest())
    assert h.status == "unhealthy" and h.message == "loading and warming up models", h
    assert refused(stub, pb2) == (grpc.StatusCode.UNAVAILABLE, LOADING)
    # The Open Inference Protocol over HTTP says the same: 503, retry later.
    s.wait_http_listening()
    status, body = http_post(f"{s.http_url}/v2/models/slow/infer",
                             b'{"inputs":[{"name":"INPUT__0","datatype":"FP32","shape":[1],"data":[1]}]}')
    assert status == 503 and "loading" in body, (status, body)
    assert http_status(f"{s.metrics_url}/readyz") == (503, "loading models\n")
    assert http_status(f"{s.metrics_url}/livez") == (200, "ok\n")
    assert_probes(s.addr, SERVICE, serving=False)
    assert_probes(s.addr, "", serving=False)
    assert_probes(s.addr, "liveness", serving=True)
    # Every check above ran while loading: the warm-up has not finished yet.
    assert stub.HealthCheck(pb2.HealthRequest()).status == "unhealthy", "the warm-up ended during the checks"

    s.wait_ok(pb)
    assert health(ch, "") == SERVING
    assert health(ch, SERVICE) == SERVING
    assert http_status(f"{s.metrics_url}/readyz") == (200, "ready\n")
    assert_probes(s.addr, SERVICE, serving=True)

    # 24 slow requests in flight (2 workers x 400 ms: about 5 s of work), then SIGTERM.
    threads, results, errors = send_all(stub, pb2, 24)
    wait_held(stub, pb2, 24)
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: health(ch, SERVICE) == NOT_SERVING, 10, "readiness NOT_SERVING after SIGTERM")
    s.wait_log('signal="SIGTERM"')

    # Draining: probes see NOT_SERVING, new work is refused as draining, queued work goes on.
    assert health(ch, "") == NOT_SERVING
    h = stub.HealthCheck(pb2.HealthRequest())
    assert h.status == "unhealthy" and h.message == "draining: shutting down", h
    assert refused(stub, pb2) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
    assert http_status(f"{s.metrics_url}/readyz") == (503, "draining\n")
    assert_probes(s.addr, SERVICE, serving=False)
    # A draining pod is not dead: liveness stays SERVING, so nothing restarts it.
    assert health(ch, "liveness") == SERVING
    info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    assert int(info["queue_depth"]) + int(info["workers_busy"]) > 0, "the drain ended during the checks"

    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(results) == [(i, [float(i)] * 4) for i in range(24)]
    assert s.proc.wait(timeout=30) == 0
    assert "shutdown grace ran out" not in s.output()


def test_sigint_drains_like_sigterm(pb, server_factory):
    pb2, pb2_grpc = pb
    s = server_factory("--model", "slow=builtin:delay:400", "--workers", "1", "--intra-op-threads", "1")
    s.wait_ok(pb)
    ch = s.channel()
    stub = pb2_grpc.ComputeServiceStub(ch)
    threads, results, errors = send_all(stub, pb2, 8)   # about 3 s of work on one worker
    wait_held(stub, pb2, 8)
    s.proc.send_signal(signal.SIGINT)
    wait_until(lambda: health(ch, SERVICE) == NOT_SERVING, 10, "readiness NOT_SERVING after SIGINT")
    s.wait_log('signal="SIGINT"')
    assert refused(stub, pb2) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
    assert http_status(f"{s.metrics_url}/readyz") == (503, "draining\n")
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(results) == [(i, [float(i)] * 4) for i in range(8)]
    assert s.proc.wait(timeout=30) == 0


def test_a_grace_that_runs_out_refuses_the_queue_and_the_process_exits(pb, server_factory):
    """One worker stuck in a 60 s forward, three requests queued behind it, and
    --shutdown-grace 300ms: the queued requests are answered UNAVAILABLE as
    draining once the grace ends (not when the forward ends), and the process
    exits without waiting for the forward."""
    pb2, pb2_grpc = pb
    s = server_factory("--model", "stuck=builtin:delay:60000", "--workers", "1", "--intra-op-threads", "1",
                       "--shutdown-grace", "300ms")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    answered = {}

    def call(i):
        try:
            stub.Compute(pb2.ComputeRequest(data=b"\0" * 4, shape=[1], request_id=i), timeout=120)
            outcome = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            outcome = (e.code(), e.details())
        answered[i] = (*outcome, time.monotonic())

    first = threading.Thread(target=call, args=(0,))
    first.start()
    wait_until(lambda: stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info["workers_busy"] == "1",
               30, "the worker to start the first request")
    queued = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in queued:
        t.start()
    wait_held(stub, pb2, 4, queued=3)

    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    for t in queued:
        t.join(timeout=30)
    for i in (1, 2, 3):
        code, details, at = answered[i]
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, DRAINING), answered[i]
        # At the end of the grace, long before the stuck forward could finish.
        assert 0.25 <= at - signalled < 10, at - signalled
    s.wait_log("shutdown grace ran out; queued requests were answered UNAVAILABLE")
    # The process exits although its worker is still in the 60 s forward.
    assert s.proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 30
    first.join(timeout=30)
    # The forward still running when the process exits cannot be answered.
    assert answered[0][0] == grpc.StatusCode.UNAVAILABLE, answered[0]


def test_a_connection_past_its_age_and_grace_is_closed_under_its_calls(pb, server_factory):
    """--max-connection-age 1s with a 300 ms grace: a 3 s call on the connection
    ends UNAVAILABLE when the grace runs out; the client reconnects and is served."""
    pb2, pb2_grpc = pb
    s = server_factory("--model", "slow=builtin:delay:3000", "--model", "double=builtin:scale:2",
                       "--max-connection-age", "1s", "--max-connection-age-grace", "300ms")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 4, shape=[1], model_id="slow"), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
    x = np.ones((1, 2), dtype=np.float32)
    reply = stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 2], model_id="double"), timeout=30)
    assert np.frombuffer(reply.data, dtype=np.float32).tolist() == [2.0, 2.0]
    assert s.terminate() == 0


def test_bad_configuration_exits_64_with_the_numbers(server_factory):
    s = server_factory("--workers", "4", "--intra-op-threads", "8", "--cpu-limit", "2")
    assert s.proc.wait(timeout=30) == 64
    out = s.output()
    assert "4 workers x 8 intra-op threads = 32 > CPU budget 2" in out, out


def test_unloadable_model_exits_nonzero_with_the_reason(server_factory):
    s = server_factory("--model", "m=/nonexistent/model.pt")
    assert s.proc.wait(timeout=30) != 0
    assert "/nonexistent/model.pt" in s.output()

"""Start-up, readiness and SIGTERM drain of the real binary, seen by real
grpc.health.v1 and ComputeService clients."""

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "splitlearn.comm.ComputeService"


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_startup_serving_and_drain(pb, server_factory):
    pb2, pb2_grpc = pb
    # The delay model's warm-up forward sleeps 2 s: long enough to see NOT_SERVING.
    s = server_factory(
        "--model", "slow=builtin:delay:300",
        "--model", "warm=builtin:delay:2000",
        "--warmup-shape", "warm=1",
        "--workers", "2",
    )
    s.wait_listening()
    ch = s.channel()
    stub = pb2_grpc.ComputeServiceStub(ch)
    NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING

    assert health(ch, "") == NOT_SERVING
    assert health(ch, SERVICE) == NOT_SERVING
    assert health(ch, "liveness") == SERVING
    h = stub.HealthCheck(pb2.HealthRequest())
    assert h.status == "unhealthy" and "loading" in h.message
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 4, shape=[1]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    s.wait_ok(pb)
    assert health(ch, "") == SERVING
    assert health(ch, SERVICE) == SERVING

    # 20 slow requests in flight (2 workers x 300 ms: about 3 s of work), then SIGTERM.
    results, errors = [], []

    def call(i):
        x = np.full((1, 4), i, dtype=np.float32)
        try:
            r = stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 4], request_id=i), timeout=60)
            results.append((i, np.frombuffer(r.data, dtype=np.float32).tolist()))
        except grpc.RpcError as err:
            errors.append((i, err.code(), err.details()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    # Every request has reached the server (queued or running) before SIGTERM.
    deadline = time.time() + 30
    while True:
        info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
        held = int(info["queue_depth"]) + int(info["workers_busy"]) + int(info["requests_computed"])
        if held >= 20:
            break
        assert time.time() < deadline, info
        time.sleep(0.02)
    s.proc.send_signal(15)
    time.sleep(0.3)

    # Draining: probes see NOT_SERVING, new work is refused, queued work goes on.
    assert health(ch, SERVICE) == NOT_SERVING
    assert stub.HealthCheck(pb2.HealthRequest()).status == "unhealthy"
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 16, shape=[1, 4]), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(results) == [(i, [float(i)] * 4) for i in range(20)]
    assert s.proc.wait(timeout=30) == 0


def test_bad_configuration_exits_64_with_the_numbers(server_factory):
    s = server_factory("--workers", "4", "--intra-op-threads", "8", "--cpu-limit", "2")
    assert s.proc.wait(timeout=30) == 64
    out = s.output()
    assert "4 workers x 8 intra-op threads = 32 > CPU budget 2" in out, out


def test_unloadable_model_exits_nonzero_with_the_reason(server_factory):
    s = server_factory("--model", "m=/nonexistent/model.pt")
    assert s.proc.wait(timeout=30) != 0
    assert "/nonexistent/model.pt" in s.output()

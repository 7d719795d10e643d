"""The thread model seen from outside: the process's thread count stays within
the plan under any client concurrency, and a stuck worker fails liveness."""

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BIN, CLIENT, http_status, probe, wait_until

# Threads the plan does not count but the process always has: libtorch's and
# the allocator's helpers, the signal driver. Measured idle, not guessed.
SLACK = 4


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def load(stub, pb2, clients: int, seconds: float, errors: list):
    stop = time.time() + seconds
    x = np.ones((1, 512), dtype=np.float32).tobytes()

    def client():
        while time.time() < stop:
            try:
                stub.Compute(pb2.ComputeRequest(data=x, shape=[1, 512]), timeout=30)
            except grpc.RpcError as e:
                errors.append(e.code())
                return

    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    return ts


@pytest.mark.parametrize("batching", [[], ["--max-batch-size", "32", "--batch-timeout-us", "200"]],
                         ids=["unbatched", "batched"])
def test_thread_count_stays_within_the_plan_from_1_to_64_clients(pb, server_factory, batching):
    pb2, pb2_grpc = pb
    # Batched forwards are GEMMs, where MKL would size its own pool from the machine.
    # The CPU thread plan: a CUDA context would add the driver's own threads.
    s = server_factory("--workers", "2", "--intra-op-threads", "1", "--io-threads", "2", "--device", "cpu", *batching)
    s.wait_ok(pb)
    channels = [s.channel() for _ in range(8)]
    info = pb2_grpc.ComputeServiceStub(channels[0]).GetServiceInfo(pb2.ServiceInfoRequest())
    planned = int(info.custom_info["planned_threads"])
    idle = threads_of(s.proc.pid)
    assert idle <= planned + SLACK, f"idle {idle} threads, plan {planned}"

    peaks = {}
    for clients in (1, 8, 64):
        errors = []
        ts = []
        for i, ch in enumerate(channels):
            share = clients // len(channels) + (1 if i < clients % len(channels) else 0)
            if share:
                ts += load(pb2_grpc.ComputeServiceStub(ch), pb2, share, 2.0, errors)
        peak = 0
        while any(t.is_alive() for t in ts):
            peak = max(peak, threads_of(s.proc.pid))
            time.sleep(0.02)
        assert errors == []
        peaks[clients] = peak
    assert max(peaks.values()) <= planned + SLACK, f"peaks {peaks}, plan {planned}"
    # Flat: 64 clients cost no more threads than one.
    assert peaks[64] == peaks[1], peaks
    assert s.terminate() == 0


def test_a_stalled_worker_fails_liveness_until_it_finishes(pb, server_factory):
    pb2, pb2_grpc = pb
    # One forward of 5 s against a 500 ms stall timeout: stalled for about 4.5 s.
    s = server_factory("--model", "stuck=builtin:delay:5000", "--workers", "1", "--stall-timeout", "500ms")
    s.wait_ok(pb)
    ch = s.channel()
    stub = pb2_grpc.ComputeServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)

    def live():
        return health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status

    assert live() == health_pb2.HealthCheckResponse.SERVING
    assert http_status(f"{s.metrics_url}/livez") == (200, "ok\n")
    t = threading.Thread(target=lambda: stub.Compute(pb2.ComputeRequest(data=b"\0" * 4, shape=[1]), timeout=30))
    t.start()
    wait_until(lambda: live() == health_pb2.HealthCheckResponse.NOT_SERVING, 4,
               "liveness NOT_SERVING while the worker is stuck")
    s.wait_log("worker stalled: busy on one job past --stall-timeout; liveness NOT_SERVING")
    assert stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info["workers_stalled"] == "1"
    assert http_status(f"{s.metrics_url}/livez") == (503, "1 worker(s) stalled past --stall-timeout\n")
    # The liveness probe fails with both probe commands.
    for binary in (BIN, CLIENT):
        r = probe(binary, s.addr, "--service", "liveness")
        assert r.returncode == 1 and r.stdout.strip().endswith(": NOT_SERVING"), (binary.name, r)
    assert t.is_alive(), "the stall ended during the checks"
    t.join()
    wait_until(lambda: live() == health_pb2.HealthCheckResponse.SERVING, 10, "liveness to recover")
    assert http_status(f"{s.metrics_url}/livez") == (200, "ok\n")
    s.wait_log("stalled worker finished its job; liveness SERVING again")
    for binary in (BIN, CLIENT):
        assert probe(binary, s.addr, "--service", "liveness").returncode == 0
    assert s.terminate() == 0


def test_loading_and_warming_up_a_model_leaves_no_threads_behind(pb, server_factory):
    """Loading runs on a thread that ends with it: the OpenMP helpers a load-time
    warm-up starts end with it too. Left behind, they would sit outside the
    thread plan, and with more OpenMP threads than cores libgomp stops spinning
    between parallel regions: every forward on a worker would then wake its
    helpers through the kernel (a forward nearly twice as slow on 2 cores)."""
    import torch
    from conftest import FIXTURES
    from test_training import compute

    def threads_after_a_request(*warmup):
        s = server_factory("--model", f"m={FIXTURES / 'mlp512.pt'}", "--workers", "1",
                           "--intra-op-threads", "2", "--device", "cpu", *warmup)
        s.wait_ok(pb)
        # A GEMM big enough to run on both intra-op threads.
        compute(pb[1].ComputeServiceStub(s.channel()), pb[0], torch.ones(512, 512), model_id="m")
        n = threads_of(s.proc.pid)
        assert s.terminate() == 0
        return n

    cold = threads_after_a_request()
    warmed = threads_after_a_request("--warmup-shape", "m=512x512")
    assert warmed == cold, f"{warmed} threads after a warm-up, {cold} without"

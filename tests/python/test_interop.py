"""A splitlearn_comm-style client (grpcio stubs from the project's proto, the
package's own tensor encodings) against the real splitserve binary, checked
against the venv's torch running the same TorchScript file."""

import time
import tomllib
import zlib

import grpc
import numpy as np
import pytest
import torch

from conftest import ROOT, fixture_path


class TensorCodec:
    """What splitlearn_comm's TensorCodec does: raw numpy bytes, no dtype on the wire."""

    def __init__(self, dtype=np.float32):
        self.dtype = dtype

    def encode(self, tensor):
        return tensor.cpu().numpy().astype(self.dtype).tobytes(), tuple(tensor.shape)

    def decode(self, data, shape):
        return torch.from_numpy(np.frombuffer(data, dtype=self.dtype).reshape(shape).copy()).float()


class CompressedTensorCodec(TensorCodec):
    """splitlearn_comm's CompressedTensorCodec: zlib over the raw bytes."""

    def encode(self, tensor):
        data, shape = super().encode(tensor)
        return zlib.compress(data, 6), shape

    def decode(self, data, shape):
        return super().decode(zlib.decompress(data), shape)


CODECS = {
    "float32": (TensorCodec(np.float32), 1e-5),
    "float16": (TensorCodec(np.float16), 2e-2),
    "zlib-float32": (CompressedTensorCodec(np.float32), 1e-5),
    "zlib-float16": (CompressedTensorCodec(np.float16), 2e-2),
}


@pytest.fixture(scope="module")
def mlp_server(pb, request):
    from conftest import Server

    # The reference is torch on the CPU: pin the server there too (the default,
    # --device auto, takes a GPU where there is one; test_gpu.py covers that).
    s = Server(
        "--model", f"mlp={fixture_path('mlp.pt')}",
        "--model", "triple=builtin:scale:3",
        "--max-message-bytes", str(1024 * 1024),
        "--device", "cpu",
        "--workers", "1", "--intra-op-threads", "1",
    )
    s.wait_ok(pb)
    yield s
    assert s.terminate() == 0


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_compute_matches_torch_for_every_client_encoding(pb, mlp_server, codec_name):
    pb2, pb2_grpc = pb
    codec, tol = CODECS[codec_name]
    stub = pb2_grpc.ComputeServiceStub(mlp_server.channel())
    model = torch.jit.load(str(fixture_path("mlp.pt")))
    torch.manual_seed(7)
    x = torch.randn(5, 16)
    data, shape = codec.encode(x)
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=list(shape), request_id=3), timeout=30)
    assert reply.request_id == 3
    assert reply.HasField("compute_time_ms") and reply.compute_time_ms >= 0
    assert reply.HasField("monitoring_data") and reply.monitoring_data.memory_mb > 0
    got = codec.decode(reply.data, tuple(reply.shape))
    # The reference sees what the server saw: the input at the wire's precision.
    wire = TensorCodec(codec.dtype)
    seen = wire.decode(*wire.encode(x))
    with torch.no_grad():
        want = model(seen)
    assert got.shape == want.shape == (5, 8)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_named_model_and_service_calls(pb, mlp_server):
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(mlp_server.channel())
    codec = TensorCodec()
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data, shape = codec.encode(x)
    # GetServiceInfo counts every tensor RPC: exactly the three made here.
    before = stub.GetServiceInfo(pb2.ServiceInfoRequest()).total_requests
    for k in range(3):
        reply = stub.Compute(pb2.ComputeRequest(data=data, shape=list(shape), model_id="triple"))
        assert torch.equal(codec.decode(reply.data, tuple(reply.shape)), x * 3)

    since_start = time.monotonic() - mlp_server.started
    health = stub.HealthCheck(pb2.HealthRequest())
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert health.status == "ok" and health.version == version, health
    # Uptime counts from the process's start: positive, never more than the test has seen.
    assert 0 < health.uptime_seconds <= since_start + 0.5, (health.uptime_seconds, since_start)
    later = stub.HealthCheck(pb2.HealthRequest()).uptime_seconds
    assert later >= health.uptime_seconds

    info = stub.GetServiceInfo(pb2.ServiceInfoRequest())
    assert info.service_name == "mlp"
    assert info.device == "cpu"
    assert info.total_requests - before == 3, (before, info.total_requests)
    assert info.custom_info["models"] == "mlp@cpu,triple@cpu"
    # The plan the fixture asked for, in the words of the startup log.
    plan = info.custom_info["thread_plan"]
    assert (info.custom_info["workers"], info.custom_info["intra_op_threads"]) == ("1", "1"), info.custom_info
    assert plan.startswith("1 workers x 1 intra-op threads (CPU budget "), plan

    snaps = []
    for item in stub.StreamMonitoring(pb2.MonitoringStreamRequest(sampling_interval=0.1), timeout=10):
        snaps.append(item.snapshot)
        if len(snaps) == 2:
            break
    # --device cpu: no GPU in the snapshot even on a machine that has one.
    assert len(snaps) == 2
    assert not any(s.gpu_available for s in snaps), snaps
    # memory_mb is the process's resident set, as the kernel counts it.
    rss_mb = resident_mb(mlp_server.proc.pid)
    assert all(0.5 * rss_mb < s.memory_mb < 2 * rss_mb for s in snaps), (rss_mb, snaps)


def resident_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def test_errors_have_clear_statuses(pb, mlp_server):
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(mlp_server.channel())

    def code_of(req):
        with pytest.raises(grpc.RpcError) as e:
            stub.Compute(req, timeout=30)
        return e.value.code(), e.value.details()

    code, msg = code_of(pb2.ComputeRequest(data=b"\0" * 7, shape=[1, 16]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "7 bytes" in msg
    code, msg = code_of(pb2.ComputeRequest(data=b"\0" * 64, shape=[1, 16], model_id="missing"))
    assert code == grpc.StatusCode.NOT_FOUND and "missing" in msg
    code, msg = code_of(pb2.ComputeRequest(data=b"\0" * 4 * 15, shape=[1, 15]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot be multiplied" in msg
    # Over --max-message-bytes (1 MiB here): RESOURCE_EXHAUSTED, like the Python server.
    code, msg = code_of(pb2.ComputeRequest(data=b"\0" * (2 * 1024 * 1024), shape=[512 * 1024]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    # Split training: a training forward is answered with its forward_id; a
    # backward for an id nobody stored is NOT_FOUND, never a silent echo.
    fwd = stub.Compute(pb2.ComputeRequest(data=b"\0" * 64, shape=[1, 16], training_mode=True))
    assert fwd.forward_id and list(fwd.shape) == [1, 8]
    with pytest.raises(grpc.RpcError) as e:
        stub.ComputeBackward(
            pb2.BackwardRequest(grad_output_data=b"\0" * 32, grad_output_shape=[1, 8], forward_id="nope")
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()
    # Still serving.
    ok = stub.Compute(pb2.ComputeRequest(data=b"\0" * 64, shape=[1, 16]))
    assert list(ok.shape) == [1, 8]

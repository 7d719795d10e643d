"""On a machine with a CUDA device: `--device cuda` answers what torch answers on
CUDA, `--device auto` picks the GPU, and /metrics exports the NVML series.
Skipped, with the reason, where torch sees no CUDA device; a CUDA device the
process does not have is refused everywhere."""

import grpc
import numpy as np
import pytest
import torch

from conftest import fixture_path, metric_value
from test_interop import CODECS, TensorCodec

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: torch.cuda.is_available() is false (this test needs a GPU)",
)

NVML_FAMILIES = [
    "splitserve_gpu_memory_used_bytes",
    "splitserve_gpu_memory_total_bytes",
    "splitserve_gpu_utilization_ratio",
]


@pytest.fixture(scope="module")
def cuda_server(pb):
    from conftest import Server

    s = Server(
        "--model", f"mlp={fixture_path('mlp.pt')}",
        "--model", "wide=builtin:mlp:64x256x32",
        "--device", "cuda",
    )
    s.wait_ok(pb)
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def reference():
    # What the server's libtorch does by default: no TF32 in float32 matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.jit.load(str(fixture_path("mlp.pt")), map_location="cuda").eval()


@needs_cuda
def test_the_server_runs_on_the_gpu(pb, cuda_server):
    pb2, pb2_grpc = pb
    info = pb2_grpc.ComputeServiceStub(cuda_server.channel()).GetServiceInfo(pb2.ServiceInfoRequest())
    assert info.device == "cuda:0", info.device
    assert info.custom_info["models"] == "mlp@cuda:0,wide@cuda:0", info.custom_info


@needs_cuda
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_cuda_outputs_equal_torch_on_cuda(pb, cuda_server, reference, codec_name):
    pb2, pb2_grpc = pb
    codec, tol = CODECS[codec_name]
    stub = pb2_grpc.ComputeServiceStub(cuda_server.channel())
    torch.manual_seed(11)
    x = torch.randn(7, 16)
    data, shape = codec.encode(x)
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=list(shape)), timeout=60)
    got = codec.decode(reply.data, tuple(reply.shape))
    wire = TensorCodec(codec.dtype)
    seen = wire.decode(*wire.encode(x))
    with torch.no_grad():
        want = reference(seen.cuda()).cpu()
    assert got.shape == want.shape == (7, 8)
    torch.testing.assert_close(got, want, atol=max(tol, 1e-4), rtol=max(tol, 1e-4))


@needs_cuda
def test_builtin_mlp_on_cuda_equals_its_cpu_answer(pb, cuda_server, server_factory):
    """The built-in MLP's weights do not depend on the device: the same spec on
    the CPU gives the same answer within float32 rounding."""
    pb2, pb2_grpc = pb
    cpu = server_factory("--model", "wide=builtin:mlp:64x256x32", "--device", "cpu")
    cpu.wait_ok(pb)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    answers = []
    for s in (cuda_server, cpu):
        stub = pb2_grpc.ComputeServiceStub(s.channel())
        reply = stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[5, 64], model_id="wide"), timeout=60)
        answers.append(np.frombuffer(reply.data, dtype=np.float32).reshape(5, 32))
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-4, rtol=1e-4)
    assert cpu.terminate() == 0


@needs_cuda
def test_auto_picks_the_gpu(pb, server_factory):
    pb2, pb2_grpc = pb
    s = server_factory("--model", "k=builtin:scale:2")  # --device auto, the default
    s.wait_ok(pb)
    info = pb2_grpc.ComputeServiceStub(s.channel()).GetServiceInfo(pb2.ServiceInfoRequest())
    assert info.device == "cuda:0", info.device
    assert s.terminate() == 0


def test_a_missing_cuda_device_is_refused_with_the_count(server_factory):
    """Runs everywhere: on a machine without a GPU, cuda:0 is the missing one."""
    n = torch.cuda.device_count()
    s = server_factory("--model", "k=builtin:scale:2", "--device", f"cuda:{n}")
    assert s.proc.wait(timeout=60) == 1
    out = s.output()
    assert f"device cuda:{n} is not available: this process sees {n} CUDA device(s)" in out, out[-2000:]


@needs_cuda
def test_nvml_series_are_exported(pb, cuda_server):
    pb2, pb2_grpc = pb
    # Some GPU work first, so that this process holds GPU memory.
    stub = pb2_grpc.ComputeServiceStub(cuda_server.channel())
    x = np.ones((4, 64), dtype=np.float32)
    stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[4, 64], model_id="wide"), timeout=60)
    text = cuda_server.metrics()
    missing = [f for f in NVML_FAMILIES if metric_value(text, f, device="cuda:0") is None]
    assert missing == [], f"NVML series missing from /metrics: {missing}\n{text[-3000:]}"
    total = metric_value(text, "splitserve_gpu_memory_total_bytes", device="cuda:0")
    used = metric_value(text, "splitserve_gpu_memory_used_bytes", device="cuda:0")
    utilization = metric_value(text, "splitserve_gpu_utilization_ratio", device="cuda:0")
    # NVML's total is the board's memory; CUDA reports nearly the same (less what the driver keeps).
    _, cuda_total = torch.cuda.mem_get_info(0)
    assert 0.9 * total <= cuda_total <= total * 1.01, (total, cuda_total)
    assert 0 < used <= total, (used, total)
    assert 0.0 <= utilization <= 1.0, utilization
    # The gRPC monitoring snapshot reports the same device.
    snap = next(iter(stub.StreamMonitoring(pb2.MonitoringStreamRequest(sampling_interval=0.1), timeout=10))).snapshot
    assert snap.gpu_available and snap.gpu_memory_used_mb > 0, snap


@needs_cuda
def test_cuda_errors_stay_clear_statuses(pb, cuda_server):
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(cuda_server.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(pb2.ComputeRequest(data=b"\0" * 4 * 15, shape=[1, 15]), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be multiplied" in e.value.details()
    ok = stub.Compute(pb2.ComputeRequest(data=b"\0" * 64, shape=[1, 16]), timeout=60)
    assert list(ok.shape) == [1, 8]


@needs_cuda
def test_a_repository_model_runs_where_its_instance_group_says(tmp_path, server_factory):
    """KIND_GPU with gpus [0] runs on cuda:0 while --device is cpu; KIND_CPU stays on the CPU."""
    import tritonclient.grpc as tgrpc

    from test_repository import Scale, grpc_infer, scale_config, start, write_model

    repo = tmp_path / "models"
    write_model(repo, "on_gpu", scale_config("on_gpu") + "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]",
                {1: Scale(3.0)})
    write_model(repo, "on_cpu", scale_config("on_cpu") + "instance_group [ { kind: KIND_CPU } ]",
                {1: Scale(3.0)})
    s = start(server_factory, repo, "--device", "cpu")
    g = tgrpc.InferenceServerClient(s.addr)
    x = np.ones((2, 2), np.float32)
    for name in ("on_gpu", "on_cpu"):
        np.testing.assert_allclose(grpc_infer(g, name, [x]).as_numpy("OUTPUT__0"), x * 3.0)
    text = s.metrics()
    assert metric_value(text, "splitserve_model_info", model="on_gpu", device="cuda:0") == 1
    assert metric_value(text, "splitserve_model_info", model="on_cpu", device="cpu") == 1
    assert s.terminate() == 0


@needs_cuda
def test_triton_gpu_families_are_labelled_by_gpu_uuid(cuda_server):
    """Triton's GPU families (nv_gpu_*), one series per GPU labelled as Triton
    labels them, carrying the same NVML readings as splitserve's own."""
    import re
    text = cuda_server.metrics()
    uuids = re.findall(r'^nv_gpu_memory_total_bytes\{gpu_uuid="(GPU-[0-9a-fA-F-]+)"\} ', text, re.M)
    assert len(uuids) == torch.cuda.device_count(), text[-3000:]
    for family in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes"):
        assert all(metric_value(text, family, gpu_uuid=u) is not None for u in uuids), family
    totals = sorted(metric_value(text, "nv_gpu_memory_total_bytes", gpu_uuid=u) for u in uuids)
    ours = sorted(metric_value(text, "splitserve_gpu_memory_total_bytes", device=f"cuda:{i}")
                  for i in range(len(uuids)))
    assert totals == ours

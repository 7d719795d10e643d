"""On a machine with a CUDA device: `--device cuda` answers what torch answers on
CUDA, `--device auto` picks the GPU, and /metrics exports the NVML series.
Skipped, with the reason, where torch cannot use CUDA, and failed instead under
SPLITSERVE_REQUIRE_CUDA=1 (`make gpu-check`); a CUDA device the process does
not have is refused everywhere."""

import grpc
import numpy as np
import pytest
import torch

from conftest import fixture_path, metric_value, needs_cuda
from test_interop import CODECS, TensorCodec


NVML_FAMILIES = [
    "splitserve_gpu_memory_used_bytes",
    "splitserve_gpu_memory_total_bytes",
    "splitserve_gpu_utilization_ratio",
]


def gpu_metrics(server, timeout: float = 15.0) -> str:
    """/metrics once the GPU sampler thread has read NVML (it starts when
    the server is ready and reads every second)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        if metric_value(text, "splitserve_gpu_memory_total_bytes", device="cuda:0") is not None:
            return text
        assert time.monotonic() < deadline, f"no GPU series in {timeout} s:\n{text[-3000:]}"
        time.sleep(0.2)


def nvml_bus_id(index: int) -> str:
    """CUDA device `index`'s PCI bus id as NVML writes it (domain:bus:device.0)."""
    p = torch.cuda.get_device_properties(index)
    return f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"


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
    s = server_factory("--model", "k=builtin:scale:2", "--device", "auto")
    s.wait_ok(pb)
    info = pb2_grpc.ComputeServiceStub(s.channel()).GetServiceInfo(pb2.ServiceInfoRequest())
    assert info.device == "cuda:0", info.device
    assert s.terminate() == 0


def test_a_missing_cuda_device_is_refused_with_the_reason(server_factory):
    """Runs everywhere: on a machine without a GPU, cuda:0 is the missing one and
    the refusal says why CUDA cannot start, not that it counts 0 devices."""
    n = torch.cuda.device_count()
    s = server_factory("--model", "k=builtin:scale:2", "--device", f"cuda:{n}")
    assert s.proc.wait(timeout=60) == 1
    out = s.output()
    if n > 0:
        assert f"device cuda:{n} is not available: this process sees {n} CUDA device(s)" in out, out[-2000:]
    else:
        assert "device cuda:0 is not available: CUDA cannot start: " in out, out[-2000:]
        assert "0 CUDA device" not in out, out[-2000:]


def test_auto_without_cuda_says_why_it_serves_on_the_cpu(pb, server_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks it (test_auto_picks_the_gpu)")
    s = server_factory("--model", "k=builtin:scale:2", "--device", "auto")
    s.wait_ok(pb)
    line = s.wait_log("serving on the CPU")
    assert "reason=" in line and ("driver" in line or "without CUDA" in line), line
    assert s.terminate() == 0


@needs_cuda
def test_nvml_series_are_exported(pb, cuda_server):
    pb2, pb2_grpc = pb
    # Some GPU work first, so that this process holds GPU memory.
    stub = pb2_grpc.ComputeServiceStub(cuda_server.channel())
    x = np.ones((4, 64), dtype=np.float32)
    stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[4, 64], model_id="wide"), timeout=60)
    text = gpu_metrics(cuda_server)
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
    # Labelled with the GPU's PCI bus id (as nvidia-smi names it), the one CUDA calls cuda:0.
    bus = nvml_bus_id(0).lower()
    assert metric_value(text, "splitserve_gpu_memory_total_bytes", device="cuda:0") == next(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("splitserve_gpu_memory_total_bytes{") and bus in line.lower()
    ), text[-3000:]
    # The caching allocator's figures: the model's weights and the batch's
    # tensors are allocated; what it holds from the driver covers them.
    allocated = metric_value(text, "splitserve_gpu_allocator_allocated_bytes", device="cuda:0")
    reserved = metric_value(text, "splitserve_gpu_allocator_reserved_bytes", device="cuda:0")
    assert allocated is not None and reserved is not None, text[-3000:]
    assert 0 < allocated <= reserved <= used, (allocated, reserved, used)
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
def test_every_worker_warmed_up_on_the_gpu_and_batches_copy_once(pb, cuda_server):
    """Once ready, each inference worker has run each model with a warm-up
    on its own thread (its cuBLAS handle made before any client waits); plain
    forwards copy one tensor each way per forward."""
    pb2, pb2_grpc = pb
    text = cuda_server.metrics()
    workers = metric_value(text, "splitserve_threads", pool="inference")
    assert workers and metric_value(text, "splitserve_worker_warmups_total", model="wide") == workers, text[-3000:]
    stub = pb2_grpc.ComputeServiceStub(cuda_server.channel())

    def counts() -> list[float]:
        t = cuda_server.metrics()
        return [metric_value(t, "splitserve_forwards_total", model="wide") or 0.0] + [
            metric_value(t, "splitserve_device_copies_total", model="wide", direction=d) or 0.0
            for d in ("to_device", "to_host")
        ]

    before = counts()
    x = np.ones((3, 64), dtype=np.float32)
    for _ in range(3):
        stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[3, 64], model_id="wide"), timeout=60)
    forwards, to_device, to_host = (a - b for a, b in zip(counts(), before))
    assert forwards == to_device == to_host == 3, (forwards, to_device, to_host)


@needs_cuda
def test_triton_gpu_families_are_labelled_by_gpu_uuid(cuda_server):
    """Triton's GPU families (nv_gpu_*), labelled as Triton labels them, for
    the one GPU this server runs on (not every GPU of the host), carrying the
    same NVML readings and UUID as splitserve's own."""
    import re
    text = gpu_metrics(cuda_server)
    uuids = re.findall(r'^nv_gpu_memory_total_bytes\{gpu_uuid="(GPU-[0-9a-fA-F-]+)"\} ', text, re.M)
    assert len(uuids) == 1, text[-3000:]
    for family in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes"):
        assert metric_value(text, family, gpu_uuid=uuids[0]) is not None, family
    assert metric_value(text, "nv_gpu_memory_total_bytes", gpu_uuid=uuids[0]) == metric_value(
        text, "splitserve_gpu_memory_total_bytes", device="cuda:0", gpu_uuid=uuids[0]
    )


def _answers(pb, server, requests):
    """Compute's answers to `requests` (model, tensor), all in flight at once so
    that a batching server batches them."""
    from concurrent.futures import ThreadPoolExecutor

    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(server.channel())

    def one(req):
        model, x = req
        r = stub.Compute(pb2.ComputeRequest(data=x.numpy().tobytes(), shape=list(x.shape), model_id=model),
                         timeout=60)
        return torch.from_numpy(np.frombuffer(r.data, dtype=np.float32).copy()).reshape(tuple(r.shape))

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@needs_cuda
def test_batched_kv_and_adam_training_on_cuda_equal_the_cpu(pb, server_factory, tmp_path):
    """One server per device with batching, a KV model and Adam training with
    checkpoints; the same requests give the same answers, and a checkpoint
    written on the GPU resumes on the GPU with the same parameters."""
    from test_durable import train_step

    def start(device, ckpt):
        s = server_factory(
            "--model", f"mlp={fixture_path('mlp.pt')}", "--model", f"top={fixture_path('top.pt')}",
            "--model", f"attn={fixture_path('attn_kv.pt')}",
            "--max-batch-size", "mlp=8", "--batch-timeout-us", "mlp=20000",
            "--trainable", "top", "--optimizer", "adam", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "2", "--device", device)
        s.wait_ok(pb)
        return s

    cpu, gpu = start("cpu", tmp_path / "cpu"), start("cuda", tmp_path / "gpu")
    torch.manual_seed(3)
    batch = [("mlp", torch.randn(1, 16)) for _ in range(8)] + [("attn", torch.randn(2, 5, 16))]
    for a, b in zip(_answers(pb, cpu, batch), _answers(pb, gpu, batch)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    pb2, pb2_grpc = pb
    for s in (cpu, gpu):
        stub = pb2_grpc.ComputeServiceStub(s.channel())
        for k in range(4):
            train_step(stub, pb2, k)
    probe = [("top", torch.randn(3, 8))]
    trained = [_answers(pb, s, probe)[0] for s in (cpu, gpu)]
    torch.testing.assert_close(trained[1], trained[0], atol=1e-4, rtol=1e-4)
    assert gpu.terminate() == 0 and cpu.terminate() == 0
    resumed = start("cuda", tmp_path / "gpu")
    torch.testing.assert_close(_answers(pb, resumed, probe)[0], trained[1], atol=1e-5, rtol=1e-5)
    assert resumed.terminate() == 0


@needs_cuda
def test_real_oom_and_device_side_assert_on_cuda(pb, server_factory):
    """A real CUDA out of memory answers RESOURCE_EXHAUSTED and the server keeps
    serving; a real device-side assert answers INTERNAL, then UNAVAILABLE, and
    /livez fails: the restart signal."""
    from conftest import http_status, wait_until

    pb2, pb2_grpc = pb
    s = server_factory("--model", f"fault={fixture_path('device_fault.pt')}", "--device", "cuda",
                       "--stall-timeout", "1s")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())

    def call(first):
        x = np.array([[first, 1.0]], dtype=np.float32)
        return stub.Compute(pb2.ComputeRequest(data=x.tobytes(), shape=[1, 2]), timeout=60)

    with pytest.raises(grpc.RpcError) as e:
        call(4.0)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert s.metric("splitserve_rejected_requests_total", model="fault", reason="out_of_memory") == 1
    assert list(call(7.0).shape) == [1, 2]
    assert http_status(f"{s.metrics_url}/livez")[0] == 200
    with pytest.raises(grpc.RpcError) as e:
        call(5.0)
    assert e.value.code() == grpc.StatusCode.INTERNAL, e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        call(7.0)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    wait_until(lambda: http_status(f"{s.metrics_url}/livez")[0] == 503, 10, "/livez 503")
    s.terminate()

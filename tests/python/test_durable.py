"""Scale-out and durable training against the real binary: connections that
rotate under load without a failed request, the server's learning rate for
clients that send none (as unchanged splitlearn_comm clients do), and exact
resume after SIGKILL from durable checkpoints."""

import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import torch

from conftest import ROOT, fixture_path

sys.path.insert(0, str(ROOT / "examples"))
import split_training  # noqa: E402

to_wire, from_wire = split_training.to_wire, split_training.from_wire


def metric(server, family: str, **labels) -> float:
    """One sample of a family on the admin /metrics endpoint (0 if absent)."""
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=5).read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            if all(w in line for w in want):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_connection_rotation_under_load_fails_no_request(pb, server_factory):
    pb2, pb2_grpc = pb
    s = server_factory("--max-connection-age", "1s", "--max-connection-age-grace", "10s")
    s.wait_ok(pb)
    before = metric(s, "splitserve_connections_total", port="grpc")
    channel = s.channel()  # one long-lived channel, as splitlearn_comm keeps
    stub = pb2_grpc.ComputeServiceStub(channel)
    x = np.ones((1, 512), dtype=np.float32).tobytes()
    failures, done = [], []
    stop = time.time() + 5.0

    def client():
        n = 0
        while time.time() < stop:
            try:
                reply = stub.Compute(pb2.ComputeRequest(data=x, shape=[1, 512]), timeout=30)
                assert list(reply.shape) == [1, 512]
                n += 1
            except grpc.RpcError as e:
                failures.append((e.code(), e.details()))
        done.append(n)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rotated = metric(s, "splitserve_connections_total", port="grpc") - before
    # Every call answered: a request on a connection that is going away
    # finishes there, one opened after the GOAWAY is retried on a new one.
    assert failures == [], failures[:5]
    assert sum(done) > 100, done
    # The channel reconnected as its connections aged out.
    assert rotated >= 2, f"{rotated} new connections"
    assert s.terminate() == 0


def start_top(pb, server_factory, *flags):
    s = server_factory("--model", f"top={fixture_path('top.pt')}", "--trainable", "top", *flags)
    s.wait_ok(pb)
    return s, pb[1].ComputeServiceStub(s.channel())


def info(stub, pb2) -> dict:
    return stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info


def test_clients_that_send_no_learning_rate_train_with_the_servers(pb, server_factory):
    pb2, _ = pb
    s, stub = start_top(pb, server_factory, "--optimizer", "adam", "--learning-rate", "0.01")
    losses = split_training.train(stub, pb2, steps=40, lr=0.01, log=lambda _: None, server_lr=True)
    assert losses[-1] < losses[0] / 2, losses
    assert info(stub, pb2)["model.top.optimizer_steps"] == "40"
    assert s.terminate() == 0

    # Without --learning-rate the same client only gets gradients back.
    s, stub = start_top(pb, server_factory, "--optimizer", "adam")
    split_training.train(stub, pb2, steps=3, lr=0.01, log=lambda _: None, server_lr=True)
    assert info(stub, pb2)["model.top.optimizer_steps"] == "0"
    assert s.terminate() == 0


def train_step(stub, pb2, k: int):
    """Step k of a fixed sequence: the same inputs and gradients every run."""
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(4, 8, generator=g)
    data, shape = to_wire(x)
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, training_mode=True), timeout=30)
    grad = torch.randn(*reply.shape, generator=g)
    gdata, gshape = to_wire(grad)
    stub.ComputeBackward(
        pb2.BackwardRequest(grad_output_data=gdata, grad_output_shape=gshape,
                            forward_id=reply.forward_id, learning_rate=0.01),
        timeout=30,
    )


def parameters(path) -> dict:
    return {n: p.detach().clone() for n, p in torch.jit.load(str(path)).named_parameters()}


def test_sigkill_after_a_checkpoint_resumes_exactly(pb, server_factory, tmp_path):
    pb2, _ = pb
    flags = ["--optimizer", "adam", "--checkpoint-every", "3", "--checkpoint-keep", "2"]

    # Uninterrupted: six Adam steps.
    whole = tmp_path / "whole"
    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(whole))
    for k in range(6):
        train_step(stub, pb2, k)
    assert s.terminate() == 0
    expected = parameters(whole / "top.pt")
    # Checkpoints at steps 3 and 6, each complete, none half-written.
    kept = sorted(p.name for p in (whole / "top.ckpt").iterdir())
    assert kept == ["step-0000000003", "step-0000000006"], kept
    for d in kept:
        assert {f.name for f in (whole / "top.ckpt" / d).iterdir()} >= {"model.pt", "state.json", "optimizer.safetensors"}

    # Interrupted: a checkpoint at step 3, one more step, then SIGKILL.
    crashed = tmp_path / "crashed"
    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(crashed))
    for k in range(4):
        train_step(stub, pb2, k)
    s.proc.kill()
    s.proc.wait()
    # What a crash in the middle of a write leaves behind.
    (crashed / "top.ckpt" / ".tmp-step-0000000004").mkdir()
    (crashed / "top.tmp.pt").write_bytes(b"half")

    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(crashed))
    assert not (crashed / "top.ckpt" / ".tmp-step-0000000004").exists()
    assert not (crashed / "top.tmp.pt").exists()
    # The step count continues from the checkpoint; step 4 is redone.
    assert info(stub, pb2)["model.top.optimizer_steps"] == "3"
    for k in range(3, 6):
        train_step(stub, pb2, k)
    assert info(stub, pb2)["model.top.optimizer_steps"] == "6"
    assert s.terminate() == 0
    resumed = parameters(crashed / "top.pt")
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)


def test_a_resumed_model_keeps_its_pending_accumulation(pb, server_factory, tmp_path):
    """SIGTERM between the two backwards of an accumulation_step=2 step: the
    restarted server completes the same step with both gradients."""
    pb2, _ = pb

    def half_step(stub, k, accumulate):
        g = torch.Generator().manual_seed(2000 + k)
        data, shape = to_wire(torch.randn(4, 8, generator=g))
        reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, training_mode=True), timeout=30)
        gdata, gshape = to_wire(torch.randn(*reply.shape, generator=g))
        stub.ComputeBackward(
            pb2.BackwardRequest(grad_output_data=gdata, grad_output_shape=gshape, forward_id=reply.forward_id,
                                learning_rate=0.01, accumulation_step=accumulate),
            timeout=30,
        )

    flags = ["--optimizer", "sgd", "--momentum", "0.9"]
    whole = tmp_path / "whole"
    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(whole))
    for k in range(4):
        half_step(stub, k, 2)
    assert s.terminate() == 0

    split = tmp_path / "split"
    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(split))
    for k in range(3):
        half_step(stub, k, 2)
    assert s.terminate() == 0  # one backward pending: saved with the checkpoint
    s, stub = start_top(pb, server_factory, *flags, "--checkpoint-dir", str(split))
    assert info(stub, pb2)["model.top.optimizer_steps"] == "1"
    half_step(stub, 3, 2)
    assert info(stub, pb2)["model.top.optimizer_steps"] == "2"
    assert s.terminate() == 0
    expected, resumed = parameters(whole / "top.pt"), parameters(split / "top.pt")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)


def mlp_forward(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """builtin:mlp in torch: linear layers l0, l1, ... with ReLU between them."""
    n = len(weights) // 2
    for i in range(n):
        x = torch.nn.functional.linear(x, weights[f"l{i}.weight"], weights[f"l{i}.bias"])
        if i < n - 1:
            x = torch.relu(x)
    return x


def test_builtin_mlp_safetensors_checkpoints_are_read_by_torch_and_served_again(pb, server_factory, tmp_path):
    """The built-in MLP's checkpoint is a plain safetensors file: torch (the
    safetensors package) reads the trained weights and computes what the server
    answered; the server serves that file, and one torch wrote, with
    builtin:mlp:WIDTHS@FILE."""
    from safetensors.torch import load_file, save_file

    pb2, pb2_grpc = pb
    spec = "builtin:mlp:8x16x4"
    ckpt = tmp_path / "ckpt"
    s = server_factory("--model", f"m={spec}", "--trainable", "m", "--checkpoint-dir", str(ckpt),
                       "--device", "cpu", "--workers", "1", "--intra-op-threads", "1")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    for k in range(3):
        train_step(stub, pb2, k)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    data, shape = to_wire(x)
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape), timeout=30)
    trained = from_wire(reply.data, reply.shape)
    assert s.terminate() == 0

    weights = load_file(str(ckpt / "m.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "l0.weight": (16, 8), "l0.bias": (16,), "l1.weight": (4, 16), "l1.bias": (4,)}
    assert all(v.dtype == torch.float32 for v in weights.values())
    torch.testing.assert_close(mlp_forward(weights, x), trained, atol=1e-6, rtol=1e-6)

    # Weights torch writes, for the server to read.
    g = torch.Generator().manual_seed(4)
    mine = {k: torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(mine, str(tmp_path / "mine.safetensors"))
    s = server_factory("--model", f"trained={spec}@{ckpt / 'm.safetensors'}",
                       "--model", f"mine={spec}@{tmp_path / 'mine.safetensors'}",
                       "--model", f"seed={spec}", "--device", "cpu", "--workers", "1", "--intra-op-threads", "1")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())

    def answer(model):
        r = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, model_id=model), timeout=30)
        return from_wire(r.data, r.shape)

    torch.testing.assert_close(answer("trained"), trained, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(answer("mine"), mlp_forward(mine, x), atol=1e-5, rtol=1e-5)
    # The control: the seed's weights answer otherwise, so the file was really read.
    assert not torch.allclose(answer("seed"), trained, atol=1e-3)
    assert s.terminate() == 0

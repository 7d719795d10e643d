"""Split training against the real binary, checked numerically: a client holds
the bottom of a model, splitserve holds the top (tests/fixtures/generated/top.pt),
and everything must equal local torch autograd and torch.optim on an identical
full model. Plus the KV cache, the documented statuses, and examples/."""

import copy
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, fixture_path, wait_until

sys.path.insert(0, str(ROOT / "examples"))
import split_training  # noqa: E402  (examples/split_training.py, the README's example)

to_wire, from_wire = split_training.to_wire, split_training.from_wire
TOL = dict(atol=1e-5, rtol=1e-5)

OPTIMIZERS = {
    "sgd": ([], lambda ps, lr: torch.optim.SGD(ps, lr=lr)),
    "sgd-momentum-weight-decay": (
        ["--momentum", "0.9", "--weight-decay", "0.01"],
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01),
    ),
    "adam": (
        ["--optimizer", "adam", "--adam-betas", "0.8:0.99", "--weight-decay", "0.001"],
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.99), weight_decay=0.001),
    ),
}


def start(pb, server_factory, *flags):
    # The reference is torch autograd on the CPU: the server computes there too.
    s = server_factory("--model", f"top={fixture_path('top.pt')}", "--workers", "2", "--trainable", "top",
                       "--device", "cpu", *flags)
    s.wait_ok(pb)
    return s, pb[1].ComputeServiceStub(s.channel())


def compute(stub, pb2, t, **kw):
    data, shape = to_wire(t)
    reply = stub.Compute(pb2.ComputeRequest(data=data, shape=shape, **kw), timeout=30)
    return reply, from_wire(reply.data, reply.shape)


def backward(stub, pb2, grad, forward_id, **kw):
    data, shape = to_wire(grad)
    reply = stub.ComputeBackward(
        pb2.BackwardRequest(grad_output_data=data, grad_output_shape=shape, forward_id=forward_id, **kw),
        timeout=30,
    )
    return from_wire(reply.grad_input_data, reply.grad_input_shape)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradients_and_updates_equal_local_autograd_and_torch_optim(pb, server_factory, tmp_path, name):
    pb2, _ = pb
    flags, make_optimizer = OPTIMIZERS[name]
    server, stub = start(pb, server_factory, "--checkpoint-dir", str(tmp_path), *flags)
    torch.manual_seed(3)
    bottom = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    # The identical full model, trained locally end to end.
    ref_bottom = copy.deepcopy(bottom)
    ref_top = torch.jit.load(str(fixture_path("top.pt")))
    lr = 0.05
    ref_optimizer = make_optimizer(list(ref_top.parameters()), lr)

    for step in range(3):
        x, target = torch.randn(5, 6), torch.randn(5, 4)
        hidden_ref = ref_bottom(x)
        hidden_ref.retain_grad()
        out_ref = ref_top(hidden_ref)
        nn.functional.mse_loss(out_ref, target).backward()

        hidden = bottom(x)
        reply, out = compute(stub, pb2, hidden, training_mode=True)
        assert reply.forward_id, "the server names the forward"
        torch.testing.assert_close(out, out_ref.detach(), **TOL)
        out.requires_grad_()
        nn.functional.mse_loss(out, target).backward()
        grad_hidden = backward(stub, pb2, out.grad, reply.forward_id, learning_rate=lr)
        torch.testing.assert_close(grad_hidden, hidden_ref.grad, **TOL)
        # The bottom's gradients, through the returned gradient, equal the full model's.
        hidden.backward(grad_hidden)
        for p, q in zip(bottom.parameters(), ref_bottom.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)
        bottom.zero_grad()
        ref_bottom.zero_grad()
        ref_optimizer.step()
        ref_optimizer.zero_grad()

        # The server took the same step: its inference answers follow.
        probe = torch.randn(2, 8)
        _, got = compute(stub, pb2, probe)
        with torch.no_grad():
            torch.testing.assert_close(got, ref_top(probe), **TOL)

    info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    assert info["optimizer_steps"] == "3" and info["activations_stored"] == "0"
    assert info["model.top.optimizer"].startswith(name.split("-")[0])

    # SIGTERM saves the trained parameters as TorchScript that torch loads...
    assert server.terminate() == 0
    saved = torch.jit.load(str(tmp_path / "top.pt"))
    for (n, p), (m, q) in zip(saved.named_parameters(), ref_top.named_parameters()):
        assert n == m
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
    # ... and that splitserve serves again.
    again = server_factory("--model", f"top={tmp_path / 'top.pt'}", "--device", "cpu")
    again.wait_ok(pb)
    _, got = compute(pb[1].ComputeServiceStub(again.channel()), pb2, probe)
    with torch.no_grad():
        torch.testing.assert_close(got, ref_top(probe), **TOL)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_clipping_equals_torch_clip_grad_norm_and_a_huge_gradient_breaks_nothing(pb, server_factory, name):
    """--max-grad-norm is torch.nn.utils.clip_grad_norm_ before optimizer.step();
    then one grad_output of 1e20 at the largest learning rate leaves the
    TorchScript top finite on its warm-up input (zeros), and it still learns."""
    pb2, _ = pb
    flags, make_optimizer = OPTIMIZERS[name]
    _, stub = start(pb, server_factory, "--max-grad-norm", "0.5", *flags)
    ref_top = torch.jit.load(str(fixture_path("top.pt")))
    ref_optimizer = make_optimizer(list(ref_top.parameters()), 0.05)
    torch.manual_seed(8)
    probe = torch.randn(3, 8)
    for _ in range(2):
        hidden, grad = torch.randn(5, 8), 10 * torch.randn(5, 4)
        reply, _ = compute(stub, pb2, hidden, training_mode=True)
        backward(stub, pb2, grad, reply.forward_id, learning_rate=0.05)
        ref_top(hidden).backward(grad)
        norm = torch.nn.utils.clip_grad_norm_(ref_top.parameters(), 0.5)
        assert norm > 0.5, "the gradient must be large enough to clip"
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        _, got = compute(stub, pb2, probe)
        with torch.no_grad():
            torch.testing.assert_close(got, ref_top(probe), **TOL)
    info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    assert info["optimizer_grads_clipped"] == "2", info

    zeros = torch.zeros(1, 8)
    reply, _ = compute(stub, pb2, torch.randn(5, 8), training_mode=True)
    backward(stub, pb2, torch.full((5, 4), 1e20), reply.forward_id, learning_rate=10.0)
    _, warm = compute(stub, pb2, zeros)
    assert torch.isfinite(warm).all(), warm
    for k in range(3):
        reply, _ = compute(stub, pb2, torch.randn(5, 8), training_mode=True)
        backward(stub, pb2, torch.randn(5, 4), reply.forward_id, learning_rate=0.01)
        _, now = compute(stub, pb2, zeros)
        assert torch.isfinite(now).all(), now
        assert not torch.equal(now, warm), f"step {k} after the huge gradient changed nothing"
        warm = now


def test_the_readme_example_halves_the_loss(pb, server_factory):
    pb2, _ = pb
    _, stub = start(pb, server_factory, "--optimizer", "adam")
    losses = split_training.train(stub, pb2, steps=40, lr=0.01, log=lambda _: None)
    assert losses[-1] < losses[0] / 2, losses


def test_accumulated_steps_equal_torch_accumulation(pb, server_factory):
    pb2, _ = pb
    server, stub = start(pb, server_factory)
    ref_top = torch.jit.load(str(fixture_path("top.pt")))
    ref_optimizer = torch.optim.SGD(ref_top.parameters(), lr=0.1)
    torch.manual_seed(4)
    probe = torch.randn(3, 8)
    _, initial = compute(stub, pb2, probe)
    for call in range(4):
        hidden, grad = torch.randn(2, 8), torch.randn(2, 4)
        reply, _ = compute(stub, pb2, hidden, training_mode=True)
        backward(stub, pb2, grad, reply.forward_id, learning_rate=0.1, accumulation_step=2)
        ref_top(hidden).backward(grad)
        _, now = compute(stub, pb2, probe)
        if call % 2 == 0:
            assert torch.equal(now, initial), "accumulating: no step yet"
        else:
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            with torch.no_grad():
                torch.testing.assert_close(now, ref_top(probe), **TOL)
            initial = now
    # The same counts reach Prometheus.
    import urllib.request
    text = urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=5).read().decode()
    for event, count in (("forward", 4), ("backward", 4), ("optimizer_step", 2)):
        assert f'splitserve_training_events_total{{event="{event}",model="top"}} {count}' in text, event
    assert "splitserve_activations_stored 0" in text


def test_eviction_ttl_reuse_and_shape_give_their_status_and_the_server_keeps_serving(pb, server_factory):
    pb2, _ = pb
    # One forward of [4, 8] -> [4, 4] stores 128 + 64 bytes; 300 hold one.
    _, stub = start(pb, server_factory, "--activation-cache-bytes", "300")
    _, ttl_stub = start(pb, server_factory, "--activation-ttl", "300ms")
    x, g = torch.randn(4, 8), torch.randn(4, 4)

    def status(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    first, _ = compute(stub, pb2, x, training_mode=True)
    second, _ = compute(stub, pb2, x, training_mode=True)
    code, msg = status(lambda: backward(stub, pb2, g, first.forward_id))
    assert code == grpc.StatusCode.NOT_FOUND and "evicted" in msg, msg

    code, msg = status(lambda: backward(stub, pb2, torch.randn(4, 5), second.forward_id))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[4, 5]" in msg and "[4, 4]" in msg, msg
    backward(stub, pb2, g, second.forward_id)  # the corrected retry works
    code, msg = status(lambda: backward(stub, pb2, g, second.forward_id))
    assert code == grpc.StatusCode.NOT_FOUND and "already used" in msg, msg

    old, _ = compute(ttl_stub, pb2, x, training_mode=True)
    stored_at = time.monotonic()
    # An idle worker releases them once the TTL has passed, without waiting for a request.
    wait_until(lambda: ttl_stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info["activations_expired"] == "1",
               10, "the idle sweep to expire the activations")
    assert time.monotonic() - stored_at >= 0.3, "expired before --activation-ttl"
    assert ttl_stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info["activations_stored"] == "0"
    code, msg = status(lambda: backward(ttl_stub, pb2, g, old.forward_id))
    assert code == grpc.StatusCode.NOT_FOUND and "expired" in msg, msg

    info = stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info
    assert info["activations_evicted"] == "1"
    assert ttl_stub.GetServiceInfo(pb2.ServiceInfoRequest()).custom_info["activations_expired"] == "1"
    # Both still serve, training included.
    for s in (stub, ttl_stub):
        reply, _ = compute(s, pb2, x, training_mode=True, forward_id="mine")
        assert reply.forward_id == "mine"
        assert backward(s, pb2, g, "mine", learning_rate=0.01).shape == (4, 8)


def test_kv_cache_decodes_token_by_token_like_the_full_sequence(pb, server_factory):
    pb2, pb2_grpc = pb
    s = server_factory("--model", f"attn={fixture_path('attn_kv.pt')}", "--device", "cpu")
    s.wait_ok(pb)
    stub = pb2_grpc.ComputeServiceStub(s.channel())
    torch.manual_seed(5)
    hidden = torch.randn(2, 5, 16)

    def step(h, past):
        entries = []
        for k, v in past:
            kd, ks = to_wire(k)
            vd, vs = to_wire(v)
            entries.append(pb2.KVCacheEntry(key_data=kd, key_shape=ks, value_data=vd, value_shape=vs))
        reply, out = compute(stub, pb2, h, use_cache=True, past_key_values=entries)
        present = [
            (from_wire(e.key_data, e.key_shape), from_wire(e.value_data, e.value_shape))
            for e in reply.present_key_values
        ]
        return out, present

    full, full_present = step(hidden, [])
    with torch.no_grad():
        want, _ = torch.jit.load(str(fixture_path("attn_kv.pt")))(hidden, [])
    torch.testing.assert_close(full, want, **TOL)

    past, outs = [], []
    for t in range(hidden.shape[1]):
        out, past = step(hidden[:, t : t + 1], past)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    assert len(past) == 2 and past[0][0].shape == (2, 2, 5, 8)
    for (k, v), (fk, fv) in zip(past, full_present):
        torch.testing.assert_close(k, fk, **TOL)
        torch.testing.assert_close(v, fv, **TOL)


def test_the_example_copied_elsewhere_names_the_proto_it_looked_for(tmp_path):
    """Outside the checkout there is no ../proto: the example says where it looked
    and how to point it at one (or at splitlearn_comm's own stubs)."""
    import shutil
    import subprocess

    copy = tmp_path / "split_training.py"
    shutil.copy(ROOT / "examples" / "split_training.py", copy)
    r = subprocess.run([sys.executable, str(copy), "--addr", "127.0.0.1:1", "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert str(tmp_path.parent / "proto" / "splitlearn" / "comm" / "compute_service.proto") in r.stderr, r.stderr
    assert "--proto DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr

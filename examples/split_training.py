"""Split training against splitserve: this process holds the bottom of a
model, splitserve holds the top and trains it.

    make build fixtures
    target/release/splitserve serve --model top=tests/fixtures/generated/top.pt --trainable top \
        --optimizer adam --checkpoint-dir checkpoints &
    .venv/bin/python examples/split_training.py --addr 127.0.0.1:50051

Each step: the bottom's activations go to Compute with training_mode=True,
the loss is computed here on splitserve's output, its gradient goes to
ComputeBackward (with a learning_rate, so splitserve steps its optimizer), and
the gradient that comes back trains the bottom. tests/python/test_training.py
runs this file against the real binary.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def splitlearn_comm_stubs():
    """splitlearn_comm's own generated stubs, when that package is installed:
    compiling a second copy of the same proto would register
    'splitlearn.comm.*' twice in protobuf's descriptor pool ("duplicate
    symbol"). None when the package is absent."""
    import importlib
    import pkgutil

    try:
        package = importlib.import_module("splitlearn_comm")
    except ImportError:
        return None
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith("compute_service_pb2_grpc"):
            grpc_module = importlib.import_module(info.name)
            pb2 = importlib.import_module(info.name[: -len("_grpc")])
            if hasattr(grpc_module, "ComputeServiceStub"):
                return pb2, grpc_module
    return None


def load_stubs(proto: Path | None = None):
    """(pb2, pb2_grpc): splitlearn_comm's when installed, else compiled with
    grpcio-tools from `proto` (default: the proto/ of the checkout this file is in)."""
    installed = splitlearn_comm_stubs()
    if installed is not None:
        return installed
    from grpc_tools import protoc

    proto = Path(proto) if proto else ROOT / "proto"
    wanted = proto / "splitlearn" / "comm" / "compute_service.proto"
    if not wanted.is_file():
        raise SystemExit(
            f"split_training.py: {wanted} does not exist. Pass --proto DIR (the proto/ directory "
            "of a splitserve checkout), or install splitlearn_comm, whose generated stubs are used "
            "instead (README.md, \"The client side stays as it is\")."
        )
    out = tempfile.mkdtemp(prefix="splitserve-stubs-")
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto / "splitlearn" / "comm" / "compute_service.proto"),
        ]
    )
    if rc != 0:
        raise RuntimeError("protoc failed on proto/splitlearn/comm/compute_service.proto")
    sys.path.insert(0, out)
    from splitlearn.comm import compute_service_pb2, compute_service_pb2_grpc

    return compute_service_pb2, compute_service_pb2_grpc


def to_wire(t: torch.Tensor):
    """splitlearn_comm's TensorCodec: raw float32 bytes and the shape."""
    return t.detach().cpu().numpy().astype(np.float32).tobytes(), list(t.shape)


def from_wire(data: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(tuple(shape)).copy())


def train(stub, pb2, steps: int = 40, lr: float = 0.01, model_id: str = "", log=print,
          server_lr: bool = False):
    """Trains bottom (here) + top (splitserve) on a synthetic regression task;
    returns the loss of every step. With `server_lr`, ComputeBackward carries
    no learning_rate, as unchanged splitlearn_comm clients send it: the server's
    --learning-rate trains the top."""
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    y = torch.tanh(x @ torch.randn(6, 4))
    bottom = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    optimizer = torch.optim.Adam(bottom.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        hidden = bottom(x)
        data, shape = to_wire(hidden)
        reply = stub.Compute(
            pb2.ComputeRequest(data=data, shape=shape, model_id=model_id, training_mode=True),
            timeout=30,
        )
        out = from_wire(reply.data, reply.shape).requires_grad_()
        loss = nn.functional.mse_loss(out, y)
        loss.backward()
        grad, grad_shape = to_wire(out.grad)
        request = pb2.BackwardRequest(
            grad_output_data=grad,
            grad_output_shape=grad_shape,
            forward_id=reply.forward_id,
            model_id=model_id,
        )
        if not server_lr:
            request.learning_rate = lr
        back = stub.ComputeBackward(request, timeout=30)
        optimizer.zero_grad()
        hidden.backward(from_wire(back.grad_input_data, back.grad_input_shape))
        optimizer.step()
        losses.append(loss.item())
        log(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--model-id", default="", help="the top's --model NAME (default: the default model)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--server-lr", action="store_true",
                        help="send no learning_rate (the server's --learning-rate applies)")
    parser.add_argument("--proto", type=Path, default=None,
                        help="the proto/ directory of a splitserve checkout (default: ../proto from this "
                             "file); not needed when splitlearn_comm is installed")
    args = parser.parse_args()
    pb2, pb2_grpc = load_stubs(args.proto)
    stub = pb2_grpc.ComputeServiceStub(grpc.insecure_channel(args.addr))
    losses = train(stub, pb2, steps=args.steps, lr=args.lr, model_id=args.model_id,
                   server_lr=args.server_lr)
    print(f"loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

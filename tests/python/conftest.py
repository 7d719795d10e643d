"""Shared fixtures: protos compiled with grpcio-tools, the real splitserve binary."""

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "splitserve"
#: Built beside splitserve: probe and bench without libtorch (the HEALTHCHECK, the Helm test).
CLIENT = BIN.parent / "splitserve-client"
FIXTURES = ROOT / "tests" / "fixtures" / "generated"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """(compute_service_pb2, compute_service_pb2_grpc) generated from the project's proto."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    proto_dir = ROOT / "proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_dir / "splitlearn" / "comm" / "compute_service.proto"),
        ]
    )
    assert rc == 0, "protoc failed on the project's proto"
    sys.path.insert(0, str(out))
    from splitlearn.comm import compute_service_pb2, compute_service_pb2_grpc

    return compute_service_pb2, compute_service_pb2_grpc


def fixture_path(name: str) -> Path:
    p = FIXTURES / name
    assert p.is_file(), f"{p} is missing: run `make fixtures` (make test does)"
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_available() -> bool:
    """Whether this machine has a CUDA device (torch, imported only when asked)."""
    import torch

    return torch.cuda.is_available()


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why torch cannot use CUDA here (None where it can): a CPU-only build, or
    CUDA's own error (no driver, a driver too old for this build, no device)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001: any reason CUDA gives is the answer
        return f"CUDA {torch.version.cuda} cannot start: {str(e).splitlines()[0]}"
    if torch.cuda.device_count() == 0:
        return "CUDA sees no device"
    return None


#: `make gpu-check` sets it: a GPU test without a GPU fails instead of skipping.
REQUIRE_CUDA = os.environ.get("SPLITSERVE_REQUIRE_CUDA") == "1"


def needs_cuda(test):
    """Marks a test that needs a CUDA device: skipped, with the reason, where
    there is none, or failed with it under SPLITSERVE_REQUIRE_CUDA=1."""
    reason = cuda_unavailable_reason()
    if reason is None:
        return test
    if REQUIRE_CUDA:
        return pytest.mark.usefixtures("cuda_required")(test)
    return pytest.mark.skip(reason=f"needs a GPU: {reason}")(test)


@pytest.fixture(scope="session")
def cuda_required():
    # Session-scoped: it fails before any module-scoped server starts.
    pytest.fail(f"SPLITSERVE_REQUIRE_CUDA=1 but {cuda_unavailable_reason()}", pytrace=False)


def wait_until(condition, timeout: float, what: str, every: float = 0.05):
    """Polls condition() until it returns something truthy, which it returns; fails
    naming `what` (and the last value) after `timeout` seconds. Tests wait on what
    they can observe (a metric, a health state, a log line), never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(every)


def http_status(url: str, timeout: float = 5) -> tuple[int, str]:
    """(HTTP status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric_value(text: str, family: str, **labels) -> float | None:
    """The value of the first sample of `family` whose labels include `labels`, in a
    Prometheus exposition; None when there is none."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            if all(w in line.rsplit(" ", 1)[0] for w in want):
                return float(line.rsplit(" ", 1)[1])
    return None


def probe(binary: Path, addr: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`splitserve probe` or `splitserve-client probe` against addr."""
    return subprocess.run([str(binary), "probe", "--addr", addr, *extra],
                          capture_output=True, text=True, timeout=timeout)


class Server:
    """The real binary on a loopback port."""

    def __init__(self, *args: str, env: dict | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        assert BIN.is_file(), f"{BIN} is missing: run `make build`"
        # Set for a server started with --tls-cert: channel() then speaks TLS
        # (and presents a client certificate where the credentials carry one).
        self.credentials = credentials
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        # The Open Inference Protocol's HTTP/REST port (tritonclient.http takes
        # http_addr: host:port without a scheme).
        self.http_port = free_port()
        self.http_addr = f"127.0.0.1:{self.http_port}"
        self.http_url = f"http://{self.http_addr}"
        full_env = dict(os.environ)
        full_env.update(env or {})
        # The CPU unless the test is about devices: on a GPU host `auto` would
        # move every test onto CUDA, where answers differ by rounding.
        if not any(a == "--device" or a.startswith("--device=") for a in args) \
                and "SPLITSERVE_DEVICE" not in (env or {}):
            args = (*args, "--device", "cpu")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--grpc-addr", self.addr,
             "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
             "--http-addr", self.http_addr, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
        )
        # Read the log as it is written: tests can wait for a line, and a chatty
        # server never blocks on a full pipe.
        self._lines: list[str] = []
        self._lines_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            with self._lines_lock:
                self._lines.append(line)

    def log_so_far(self) -> str:
        with self._lines_lock:
            return "".join(self._lines)

    def wait_log(self, needle: str, timeout: float = 30.0) -> str:
        """Waits until the log has a line containing `needle`; returns that line."""
        def found():
            with self._lines_lock:
                return next((line for line in self._lines if needle in line), None)
        try:
            return wait_until(found, timeout, f"a log line with {needle!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- log so far ---\n{self.log_so_far()[-4000:]}") from None

    def metrics(self) -> str:
        """The Prometheus exposition of the admin port."""
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, family: str, **labels) -> float | None:
        return metric_value(self.metrics(), family, **labels)

    def channel(self, max_message_length: int = 100 * 1024 * 1024,
                credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        # The options splitlearn_comm's GRPCComputeClient sets.
        options = [
            ("grpc.max_send_message_length", max_message_length),
            ("grpc.max_receive_message_length", max_message_length),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
        ]
        credentials = credentials or self.credentials
        if credentials is None:
            return grpc.insecure_channel(self.addr, options=options)
        return grpc.secure_channel(self.addr, credentials, options=options)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.output()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not listen in time")

    def wait_http_listening(self, timeout: float = 60.0) -> None:
        """The HTTP/REST port accepts connections (it may open after the gRPC port)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.output()}"
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the HTTP port did not listen in time")

    def wait_ok(self, pb, timeout: float = 60.0) -> None:
        self.wait_listening(timeout)
        pb2, pb2_grpc = pb
        stub = pb2_grpc.ComputeServiceStub(self.channel())
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if stub.HealthCheck(pb2.HealthRequest(), timeout=1).status == "ok":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server never became healthy:\n{self.output()}")

    def wait_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Ready, as grpc.health.v1 says it over channel(): works over TLS and mTLS
        (with the server's credentials) and with --auth-token-file, whose tokens
        grpc.health.v1 does not need."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.wait_listening(timeout)
        stub = health_pb2_grpc.HealthStub(self.channel())
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.output()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = reply.status
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
            time.sleep(0.05)
        raise AssertionError(f"server never became SERVING (last: {last}):\n{self.output()}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        """Everything the process wrote, once it has exited (its log so far before)."""
        if self.proc.poll() is None:
            return "(still running)\n" + self.log_so_far()
        self._reader.join(timeout=10)
        return self.log_so_far()


@pytest.fixture
def server_factory():
    servers = []

    def start(*args: str, env: dict | None = None,
              credentials: grpc.ChannelCredentials | None = None) -> Server:
        s = Server(*args, env=env, credentials=credentials)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()

#!/usr/bin/env python3
"""`make image-test`: runs the built image the way the Helm chart's Deployment
runs it, and checks that it serves.

    .venv/bin/python scripts/image/test.py [--image splitserve:0.1.0-cpu] [--keep]

The container gets what the chart rendered with its default values gives the
pod (deploy/base/deployment.yaml, which tests/deploy keeps in sync with the
chart): its environment variables, its securityContext (uid/gid 10001, read-only
root filesystem, no capabilities, no privilege escalation), its resource limits,
a size-limited /tmp, its three ports (published on 127.0.0.1 only). As with
modelSource.type=pvc, a TorchScript model made here with the venv's torch is
mounted read-only at /models and served as `mlp` (warm-up shape 1x16), beside
`slow=builtin:delay:MILLIS` for the drain check. Then:

  image-config   user 10001, HEALTHCHECK, entrypoint, exposed ports
  ldd            no shared library missing (splitserve, splitserve-client)
  started        grpc.health.v1 SERVING for "", the compute service, liveness
  security       uid 10001, root filesystem read-only, /tmp writable
  compute        splitlearn_comm's encodings (float32, float16, zlib) give what
                 torch gives locally for the same TorchScript file
  v2-grpc        tritonclient.grpc (Open Inference Protocol) gives the same
  v2-http        tritonclient.http gives the same
  metrics        /metrics is Prometheus text with splitserve_ families that
                 counted the requests above
  healthcheck    the image's HEALTHCHECK passes (podman healthcheck run)
  sigterm        with requests in flight, SIGTERM: they finish, health turns
                 NOT_SERVING, the container exits 0 within the pod's
                 terminationGracePeriodSeconds

and, where the CUDA variant (--cuda-image, default splitserve:<version>-cuda)
has been built, without a GPU:

  cuda-ldd       no shared library missing in it either
  cuda-no-gpu    its default --device cuda stops the server at once, non-zero,
                 saying why CUDA cannot start

Prints PASS/FAIL per check and "N passed, N failed"; exits 1 on any failure.
Needs podman (scripts/image/build.sh installs it) and the project venv (torch,
grpcio, tritonclient: make setup).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "deploy" / "base" / "deployment.yaml"
CHART = ROOT / "helm" / "splitserve" / "Chart.yaml"
MODEL_DIR_IN_CONTAINER = "/models"  # the chart's modelSource.mountPath
# A model repository beside it (modelRepository.*, mounted elsewhere than /models here).
REPOSITORY_IN_CONTAINER = "/model-repository"
SLOW_MS = 3000
IN_FEATURES, OUT_FEATURES = 16, 8


# --------------------------------------------------------------------- helpers


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, every: float = 0.2):
    """Polls cond() until it returns something truthy. An error that cond()
    raises (a refused connection, ...) counts as not yet, except an
    AssertionError, which fails at once (the container exited, ...)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = f"{type(e).__name__}: {e}"
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def podman_flags(image: str) -> list[str]:
    """The flags scripts/image/common.sh settles on for this host (podman's
    defaults, or runc and lower ulimits), so that build and run agree."""
    if "PODMAN_FLAGS" in os.environ:
        return shlex.split(os.environ["PODMAN_FLAGS"])
    common = shlex.quote(str(ROOT / "scripts" / "image" / "common.sh"))
    out = sh("bash", "-c", f'source {common}; podman_flags "$1"', "podman_flags", image).stdout
    return shlex.split(out)


def chart_pod() -> dict:
    """The pod spec and the server container of the chart's rendered Deployment."""
    try:
        import yaml  # noqa: PLC0415
    except ImportError:
        # The one package beyond requirements.txt; scripts/setup-deploy-tools.sh
        # installs it into the venv too.
        sh(sys.executable, "-m", "pip", "install", "--quiet", "pyyaml>=6.0", timeout=300)
        import yaml  # noqa: PLC0415
    docs = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d and d.get("kind") == "Deployment"]
    spec = docs[0]["spec"]["template"]["spec"]
    return {"pod": spec, "container": next(c for c in spec["containers"] if c["name"] == "splitserve")}


def k8s_quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for u, f in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * f)
    return int(q)


def k8s_cpu(q: str) -> str:
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q


# ----------------------------------------------------------------- the model


def make_model(directory: Path) -> Path:
    """A small TorchScript MLP: what a user mounts at modelSource.mountPath."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, OUT_FEATURES)
    ).eval()
    path = directory / "mlp.pt"
    torch.jit.script(m).save(str(path))
    path.chmod(0o644)
    return path


class TensorCodec:
    """splitlearn_comm's TensorCodec: raw numpy bytes, no dtype on the wire."""

    def __init__(self, dtype, compress: bool = False):
        self.dtype, self.compress = dtype, compress

    def encode(self, t: torch.Tensor) -> tuple[bytes, tuple]:
        data = t.numpy().astype(self.dtype).tobytes()
        return (zlib.compress(data, 6) if self.compress else data), tuple(t.shape)

    def decode(self, data: bytes, shape) -> torch.Tensor:
        raw = zlib.decompress(data) if self.compress else data
        return torch.from_numpy(np.frombuffer(raw, dtype=self.dtype).reshape(shape).copy()).float()


def compute_stubs(tmp: Path):
    """splitlearn.comm's stubs from the project's proto (grpcio-tools), as tests/python does."""
    from grpc_tools import protoc  # noqa: PLC0415

    out = tmp / "stubs"
    out.mkdir()
    proto = ROOT / "proto"
    rc = protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(proto / "splitlearn" / "comm" / "compute_service.proto")])
    assert rc == 0, "protoc failed on the project's proto"
    sys.path.insert(0, str(out))
    from splitlearn.comm import compute_service_pb2, compute_service_pb2_grpc  # noqa: PLC0415

    return compute_service_pb2, compute_service_pb2_grpc


# ----------------------------------------------------------------- the checks


class Run:
    def __init__(self, image: str, keep: bool):
        self.image = image
        self.keep = keep
        self.flags = podman_flags(image)
        self.name = f"splitserve-image-test-{os.getpid()}"
        self.results: list[tuple[str, bool, str]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="splitserve-image-test."))
        self.model_dir = self.tmp / "models"
        self.model_dir.mkdir()
        self.model_dir.chmod(0o755)
        self.tmp.chmod(0o755)
        self.model_path = make_model(self.model_dir)
        # The example repository without its `mlp`, a name config.models already serves.
        self.repository = self.tmp / "repository"
        sh(sys.executable, str(ROOT / "examples" / "model_repository" / "make_models.py"),
           str(self.repository), timeout=300)
        shutil.rmtree(self.repository / "mlp")
        for d in [self.repository, *self.repository.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644)
        self.model = torch.jit.load(str(self.model_path))
        spec = chart_pod()
        self.pod, self.container = spec["pod"], spec["container"]
        self.grace = int(self.pod["terminationGracePeriodSeconds"])
        self.ports = {p["name"]: int(p["containerPort"]) for p in self.container["ports"]}
        self.host = {name: free_port() for name in self.ports}
        self.grpc_addr = f"127.0.0.1:{self.host['grpc']}"
        self.http_addr = f"127.0.0.1:{self.host['http']}"
        self.metrics_url = f"http://127.0.0.1:{self.host['metrics']}"
        self.pb = compute_stubs(self.tmp)
        self.started = False

    # -- bookkeeping
    def check(self, name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # noqa: BLE001 - a failed check is reported, the rest still run
            ok = False
            detail = f"{type(e).__name__}: {e}"
            if os.environ.get("IMAGE_TEST_TRACE"):
                traceback.print_exc()
        took = time.monotonic() - t0
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<13} ({took:5.1f} s)  {detail}", flush=True)
        return ok

    def podman(self, *args: str, check: bool = True, timeout: float = 120):
        return sh("podman", *args, check=check, timeout=timeout)

    def logs(self, tail: int = 40) -> str:
        p = self.podman("logs", "--tail", str(tail), self.name, check=False)
        return p.stdout + p.stderr

    def channel(self) -> grpc.Channel:
        # The options splitlearn_comm's GRPCComputeClient sets.
        return grpc.insecure_channel(self.grpc_addr, options=[
            ("grpc.max_send_message_length", 100 << 20),
            ("grpc.max_receive_message_length", 100 << 20),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
        ])

    def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        with self.channel() as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as r:
            assert r.status == 200, r.status
            ctype = r.headers.get("Content-Type", "")
            assert ctype.startswith("text/plain"), f"Content-Type {ctype!r}"
            return r.read().decode()

    # -- image-config and ldd: the image alone
    def image_config(self) -> str:
        cfg = json.loads(self.podman("image", "inspect", self.image).stdout)[0]
        c = cfg["Config"]
        assert c.get("User") == "10001:10001", f"User {c.get('User')!r}"
        assert c.get("Entrypoint") == ["splitserve"] and c.get("Cmd") == ["serve"], (c.get("Entrypoint"), c.get("Cmd"))
        assert set(c.get("ExposedPorts", {})) == {f"{p}/tcp" for p in self.ports.values()}, c.get("ExposedPorts")
        hc = c.get("Healthcheck") or cfg.get("Healthcheck")
        assert hc and hc["Test"][0] == "CMD", f"no HEALTHCHECK in the image config: {hc!r} (built without --format docker?)"
        self.healthcheck_cmd = hc["Test"][1:]
        size = int(cfg["Size"])
        return f"user 10001:10001, HEALTHCHECK {' '.join(self.healthcheck_cmd)}, {size / 1e9:.2f} GB"

    def ldd(self, image: str | None = None) -> str:
        out = []
        for binary in ("/usr/local/bin/splitserve", "/usr/local/bin/splitserve-client"):
            p = self.podman("run", "--rm", *self.flags, "--network=none", "--read-only", "--user", "10001:10001",
                            "--entrypoint", "ldd", image or self.image, binary)
            missing = [line.strip() for line in p.stdout.splitlines() if "not found" in line]
            assert not missing, f"{binary}: {missing}"
            out.append(f"{binary.rsplit('/', 1)[1]}: {len(p.stdout.splitlines())} libraries")
        return ", ".join(out) + ", none missing"

    def cuda_without_gpu(self, image: str) -> str:
        """The CUDA image as a pod without a GPU gets it (no device, no NVIDIA
        runtime): its default --device cuda must stop the server at once,
        saying why, rather than serve on the CPU or wait for a probe to fail."""
        name = f"{self.name}-cuda"
        limit = 60
        t0 = time.monotonic()
        try:
            p = self.podman("run", "--rm", "--name", name, *self.flags, "--network=none", "--read-only",
                            "--user", "10001:10001", image, "serve", check=False, timeout=limit)
        except subprocess.TimeoutExpired:
            log = self.podman("logs", "--tail", "20", name, check=False)
            self.podman("rm", "--force", "--time", "0", name, check=False)
            raise AssertionError(f"still running {limit} s after podman run (serving without a GPU?):\n"
                                 f"{(log.stdout + log.stderr)[-2000:]}") from None
        took = time.monotonic() - t0
        out = (p.stdout + p.stderr).strip()
        assert p.returncode != 0, f"exited 0 without a GPU after {took:.1f} s:\n{out[-2000:]}"
        assert "CUDA cannot start" in out, f"exit {p.returncode}, no reason given:\n{out[-2000:]}"
        reason = next(line for line in out.splitlines() if "CUDA cannot start" in line)
        return f"exit {p.returncode} after {took:.1f} s: {reason.strip()[:300]}"

    # -- the pod
    def start(self) -> str:
        c = self.container
        sc = c.get("securityContext", {})
        env: dict[str, str] = {}
        limits = (c.get("resources") or {}).get("limits", {})
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu":
                env[e["name"]] = str(int(float(k8s_cpu(str(limits["cpu"])))))  # the downward API rounds up to cores
            else:
                raise AssertionError(f"env {e['name']}: no value the test can give ({e})")
        # modelSource.type=pvc with config.models = [mlp: /models/mlp.pt (warm-up 1x16), slow: builtin:delay].
        env["SPLITSERVE_MODEL"] = (f"mlp={MODEL_DIR_IN_CONTAINER}/{self.model_path.name},"
                                   f"slow=builtin:delay:{SLOW_MS}")
        env["SPLITSERVE_WARMUP_SHAPE"] = f"mlp=1x{IN_FEATURES}"
        # modelRepository.enabled with its defaults: poll mode every 15 s.
        env["SPLITSERVE_MODEL_REPOSITORY"] = REPOSITORY_IN_CONTAINER
        env["SPLITSERVE_MODEL_CONTROL_MODE"] = "poll"
        env["SPLITSERVE_REPOSITORY_POLL_SECS"] = "15"

        args = ["run", "--detach", "--name", self.name, *self.flags]
        args += ["--user", f"{sc.get('runAsUser', 10001)}:{sc.get('runAsGroup', 10001)}"]
        if sc.get("readOnlyRootFilesystem"):
            # Exactly the chart's writable paths: podman's own tmpfs on /run, /var/tmp off.
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if "ALL" in (sc.get("capabilities") or {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if "cpu" in limits:
            args += ["--cpus", k8s_cpu(str(limits["cpu"]))]
        if "memory" in limits:
            args += ["--memory", str(k8s_quantity_bytes(str(limits["memory"])))]
        tmp_vol = next(v for v in self.pod["volumes"] if v["name"] == "tmp")
        size = (tmp_vol.get("emptyDir") or {}).get("sizeLimit")
        # The emptyDir at /tmp (group fsGroup 10001 in the pod; world-writable here).
        args += ["--tmpfs", "/tmp:rw,mode=1777" + (f",size={k8s_quantity_bytes(size)}" if size else "")]
        args += ["--volume", f"{self.model_dir}:{MODEL_DIR_IN_CONTAINER}:ro"]
        args += ["--volume", f"{self.repository}:{REPOSITORY_IN_CONTAINER}:ro"]
        for name, port in self.ports.items():
            args += ["--publish", f"127.0.0.1:{self.host[name]}:{port}"]
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        args += [self.image, *c.get("args", [])]
        self.run_cmd = args
        self.started = True  # cleanup removes it even if it was created but did not start
        t0 = time.monotonic()  # from `podman run` on: creating and starting the container count too
        self.podman(*args)

        def serving():
            state = self.podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            assert state == "running", f"container {state}:\n{self.logs()}"
            return self.health("") == "SERVING"

        try:
            wait_until(serving, 300, 'grpc.health.v1 "" SERVING', every=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- container log ---\n{self.logs()}") from None
        took = time.monotonic() - t0
        states = {s or '""': self.health(s) for s in ("", "splitlearn.comm.ComputeService", "liveness")}
        bad = {k: v for k, v in states.items() if v != "SERVING"}
        assert not bad, f"not SERVING: {bad}"
        return f"SERVING {took:.1f} s after podman run for " + ", ".join(states)

    def security(self) -> str:
        def ex(*cmd):
            return self.podman("exec", self.name, *cmd, check=False)

        ids = ex("id", "-u").stdout.strip() + ":" + ex("id", "-g").stdout.strip()
        assert ids == "10001:10001", f"runs as {ids}"
        p = ex("touch", "/opt/write-test")
        assert p.returncode != 0 and "Read-only file system" in p.stderr, f"root fs writable: {p.stderr!r}"
        p = ex("touch", "/tmp/write-test")
        assert p.returncode == 0, f"/tmp not writable: {p.stderr!r}"
        caps = ex("grep", "^CapEff", "/proc/1/status").stdout.split()
        assert caps and int(caps[1], 16) == 0, f"effective capabilities {caps}"
        nnp = ex("grep", "^NoNewPrivs", "/proc/1/status").stdout.split()
        assert nnp == ["NoNewPrivs:", "1"], nnp
        return "uid:gid 10001:10001, / read-only, /tmp writable, no capabilities, no_new_privs"

    def compute(self) -> str:
        pb2, pb2_grpc = self.pb
        torch.manual_seed(7)
        x = torch.randn(5, IN_FEATURES)
        with torch.no_grad():
            want = self.model(x)
        codecs = {
            "float32": (TensorCodec(np.float32), 1e-5),
            "float16": (TensorCodec(np.float16), 2e-2),
            "zlib-float32": (TensorCodec(np.float32, compress=True), 1e-5),
            "zlib-float16": (TensorCodec(np.float16, compress=True), 2e-2),
        }
        worst = {}
        with self.channel() as ch:
            stub = pb2_grpc.ComputeServiceStub(ch)
            assert stub.HealthCheck(pb2.HealthRequest(), timeout=10).status == "ok"
            for i, (name, (codec, tol)) in enumerate(codecs.items()):
                data, shape = codec.encode(x)
                reply = stub.Compute(pb2.ComputeRequest(data=data, shape=list(shape), request_id=i,
                                                        model_id="mlp"), timeout=30)
                assert reply.request_id == i
                got = codec.decode(reply.data, tuple(reply.shape))
                assert tuple(got.shape) == (5, OUT_FEATURES), got.shape
                ref = codec.decode(*codec.encode(want)) if codec.dtype == np.float16 else want
                err = float((got - ref).abs().max())
                assert err <= tol, f"{name}: max |diff| {err} > {tol}"
                worst[name] = err
        return "max |diff| vs torch: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())

    def _v2(self, module, url: str) -> str:
        x = np.random.default_rng(3).standard_normal((4, IN_FEATURES)).astype(np.float32)
        with torch.no_grad():
            want = self.model(torch.from_numpy(x)).numpy()
        client = module.InferenceServerClient(url=url)
        assert client.is_server_live() and client.is_server_ready(), "server not live/ready"
        assert client.is_model_ready("mlp"), "model mlp not ready"
        meta = client.get_model_metadata("mlp")
        inputs_meta = meta["inputs"] if isinstance(meta, dict) else [
            {"name": i.name, "shape": list(i.shape)} for i in meta.inputs]
        assert inputs_meta[0]["name"] == "INPUT__0" and list(map(int, inputs_meta[0]["shape"])) == [-1, IN_FEATURES], inputs_meta
        inp = module.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mlp", [inp], outputs=[module.InferRequestedOutput("OUTPUT__0")])
        got = result.as_numpy("OUTPUT__0")
        assert got is not None and got.shape == want.shape, (None if got is None else got.shape, want.shape)
        err = float(np.abs(got - want).max())
        assert err <= 1e-5, f"max |diff| {err}"
        return f"INPUT__0 {list(x.shape)} -> OUTPUT__0 {list(got.shape)}, max |diff| vs torch {err:.1e}"

    def v2_grpc(self) -> str:
        import tritonclient.grpc as tgrpc  # noqa: PLC0415

        return self._v2(tgrpc, self.grpc_addr)

    def v2_http(self) -> str:
        import tritonclient.http as thttp  # noqa: PLC0415

        return self._v2(thttp, self.http_addr)

    def repository_check(self) -> str:
        """The example repository's models, read-only as the chart mounts it, through tritonclient."""
        import tritonclient.grpc as tgrpc  # noqa: PLC0415

        client = tgrpc.InferenceServerClient(self.grpc_addr)
        index = {(m["name"], m.get("version", "")): m.get("state", "")
                 for m in client.get_model_repository_index(as_json=True).get("models", [])}
        for model in ("add_mul", "tuple_out"):
            assert index.get((model, "1")) == "READY", f"RepositoryIndex: {index}"
            assert self.health(f"model/{model}") == "SERVING", f"model/{model} health"
        a = np.arange(4, dtype=np.float32)
        inputs = []
        for i in range(2):
            x = tgrpc.InferInput(f"INPUT__{i}", [4], "FP32")
            x.set_data_from_numpy(a)
            inputs.append(x)
        r = client.infer("add_mul", inputs)
        assert np.array_equal(r.as_numpy("OUTPUT__0"), a + a), r.as_numpy("OUTPUT__0")
        assert np.array_equal(r.as_numpy("OUTPUT__1"), a * a), r.as_numpy("OUTPUT__1")
        warnings = [line for line in self.logs(400).splitlines() if '"WARN' in line or "ERROR" in line]
        assert not warnings, warnings[:3]
        return f"add_mul/1 and tuple_out/1 READY from {REPOSITORY_IN_CONTAINER} (read-only, poll), add_mul exact"

    def metrics_check(self) -> str:
        text = self.metrics()
        families = sorted({m.group(1) for m in re.finditer(r"^# TYPE (splitserve_\w+) ", text, re.M)})
        assert len(families) >= 5, f"splitserve_ families: {families}"
        served = 0.0
        for line in text.splitlines():
            if line.startswith("splitserve_requests_total{") and 'model="mlp"' in line:
                served += float(line.rsplit(" ", 1)[1])
        assert served >= 6, f"splitserve_requests_total for mlp = {served} (want >= 6 after the checks above)"
        return f"{len(families)} splitserve_ families, splitserve_requests_total{{model=\"mlp\"}} = {served:g}"

    def healthcheck(self) -> str:
        p = self.podman("healthcheck", "run", self.name, check=False)
        if p.returncode == 0:
            return f"podman healthcheck run: {(p.stdout.strip() or 'healthy')}"
        # podman without a usable healthcheck runner: run the image's HEALTHCHECK command itself.
        q = self.podman("exec", self.name, *self.healthcheck_cmd, check=False)
        assert q.returncode == 0, (f"podman healthcheck run: {p.stdout}{p.stderr}; "
                                   f"exec {self.healthcheck_cmd}: rc {q.returncode} {q.stdout}{q.stderr}")
        return f"exec {' '.join(self.healthcheck_cmd)}: rc 0 ({(p.stderr or p.stdout).strip()[:80]!r} from podman healthcheck run)"

    def sigterm(self) -> str:
        pb2, pb2_grpc = self.pb
        x = torch.ones(2, 4)
        data, shape = TensorCodec(np.float32).encode(x)
        results: list = []

        def call(i: int):
            try:
                with self.channel() as ch:
                    r = pb2_grpc.ComputeServiceStub(ch).Compute(
                        pb2.ComputeRequest(data=data, shape=list(shape), request_id=100 + i, model_id="slow"),
                        timeout=self.grace)
                results.append(("ok", TensorCodec(np.float32).decode(r.data, tuple(r.shape))))
            except grpc.RpcError as e:
                results.append(("error", f"{e.code()}: {e.details()}"))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()

        def inflight():
            return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines()
                       if line.startswith("splitserve_inflight_requests")) >= 2

        wait_until(inflight, 20, "2 requests in flight (splitserve_inflight_requests)")
        t0 = time.monotonic()
        # What the kubelet sends after the preStop hook.
        self.podman("kill", "--signal", "TERM", self.name)
        # Draining: readiness turns NOT_SERVING while the in-flight requests finish.
        draining = wait_until(lambda: self.health("splitlearn.comm.ComputeService") == "NOT_SERVING",
                              SLOW_MS / 1000, "NOT_SERVING while draining", every=0.1)
        for t in threads:
            t.join(self.grace)
        code = self.podman("wait", self.name, timeout=self.grace + 10).stdout.strip()
        took = time.monotonic() - t0
        errors = [r for r in results if r[0] != "ok"]
        assert not errors and len(results) == 2, f"in-flight requests: {results}"
        assert all(torch.equal(r[1], x) for r in results), "slow (identity) answered something else"
        assert code == "0", f"exit code {code}\n--- container log ---\n{self.logs()}"
        assert took <= self.grace, f"took {took:.1f} s > terminationGracePeriodSeconds {self.grace}"
        assert draining
        return (f"2 in-flight requests finished OK, NOT_SERVING while draining, exit 0 after {took:.1f} s "
                f"(grace {self.grace} s)")

    def cleanup(self) -> None:
        if self.started and not self.keep:
            self.podman("rm", "--force", "--time", "0", self.name, check=False)
        if not self.keep:
            subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


def main() -> int:
    app_version = re.search(r'^appVersion: *"?([^"\n]+)"?', CHART.read_text(), re.M).group(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=os.environ.get("IMAGE", f"splitserve:{app_version}-cpu"))
    ap.add_argument("--cuda-image", default=os.environ.get("CUDA_IMAGE", f"splitserve:{app_version}-cuda"),
                    help="the CUDA variant, checked without a GPU (ldd, start) when it exists")
    ap.add_argument("--keep", action="store_true", help="leave the container and the model directory")
    a = ap.parse_args()

    if subprocess.run(["podman", "image", "exists", a.image]).returncode != 0:
        print(f"FAIL  image {a.image} does not exist: run `make image` first")
        return 1
    run = Run(a.image, a.keep)
    skipped = 0
    print(f"image-test: {a.image}, ports grpc {run.grpc_addr}, http {run.http_addr}, metrics {run.metrics_url}")
    try:
        run.check("image-config", run.image_config)
        run.check("ldd", run.ldd)
        if run.check("started", run.start):
            print("        run: podman " + shlex.join(run.run_cmd), flush=True)
            run.check("security", run.security)
            run.check("compute", run.compute)
            run.check("v2-grpc", run.v2_grpc)
            run.check("v2-http", run.v2_http)
            run.check("repository", run.repository_check)
            run.check("metrics", run.metrics_check)
            run.check("healthcheck", run.healthcheck)
            run.check("sigterm", run.sigterm)
        if a.cuda_image != a.image:
            if subprocess.run(["podman", "image", "exists", a.cuda_image]).returncode == 0:
                run.check("cuda-ldd", lambda: run.ldd(a.cuda_image))
                run.check("cuda-no-gpu", lambda: run.cuda_without_gpu(a.cuda_image))
            else:
                skipped = 2
                print(f"SKIP  cuda-ldd, cuda-no-gpu: no image {a.cuda_image} (VARIANT=cuda make image builds it)")
    finally:
        run.cleanup()
    passed = sum(1 for _, ok, _ in run.results if ok)
    failed = len(run.results) - passed
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

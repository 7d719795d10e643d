"""The documented commands run as written: every ```sh and ```python block of
README.md and docs/*.md, and every command line of the chart's NOTES.txt
(rendered with the Helm SDK for its main scenarios), against the real binary.

How a block is treated is decided in the doc itself, by an HTML comment on the
line before it; no comment means "run":

    <!-- snippet: skip REASON -->      not run (a container build, minutes of load, ...)
    <!-- snippet: cluster REASON -->   needs Kubernetes: `helm install/upgrade` lines are
                                       rendered with their --set values, `kubectl apply -k`
                                       lines are built with `kubectl kustomize`, yaml blocks
                                       rendered as chart values; nothing else runs
    <!-- snippet: fragment REASON -->  an excerpt: its syntax is checked (bash -n, Python's ast)
    <!-- snippet: values -->           (a yaml block) chart values: rendered with the Helm SDK
    <!-- snippet: continues the block above -->
                                       runs after the block above, as one program
    <!-- snippet: output of the block above -->
                                       (a text block) what the block above prints: compared

A marker without a reason fails. Every skipped or validated-only block is reported
(pytest -rs shows the reasons). Blocks run concurrently, in a directory of their own
that links the checkout's target/, .venv/, tests/, examples/, proto/, helm/ and
deploy/, with `target/release` and `.venv/bin` on PATH; servers listen on 127.0.0.1.
What a block that runs may rely on, stated here, not hidden:

- A block that starts `splitserve serve` (foreground) passes when the server becomes
  ready (`/readyz`); its ports come from SPLITSERVE_GRPC_ADDR / _HTTP_ADDR /
  _METRICS_ADDR (free ports), unless the block names its own, where 50051 becomes a
  free port.
- A client block talks to one of two shared servers: a plaintext one (the default
  `mlp`, and `top`, a 768-wide MLP warmed up at 1x768, as docs/kserve.md's
  InferenceService) and a TLS one with mTLS and tokens (NOTES.txt's TLS lines,
  docs/security.md). The cluster host names the docs use are mapped to them
  (HOSTS below); `127.0.0.1:50051`/`localhost:50051` and `:8000` to their ports.
- Files a block names: `top_half.pt` (a TorchScript 768 -> 768 model), `top.pt` and
  `enc.pt` (fixtures), `models/` (examples/model_repository, written by its
  make_models.py), `ca.crt`, `client.crt`, `client.key` and `$TOKEN` (the TLS
  server's CA, a client certificate, an `infer` token). `/tmp/X` becomes a directory
  of the block's own. Python blocks find the stubs of `proto/` on PYTHONPATH.
- `make build fixtures` is a no-op here: make test built both before this runs.
"""

from __future__ import annotations

import ast
import datetime
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import BIN, FIXTURES, ROOT, Server, free_port

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"sh", "bash", "shell", "python"}
MARKER = re.compile(
    r"^<!--\s*snippet:\s*(skip|cluster|fragment|values|continues the block above|output of the block above)\b\s*(.*?)\s*-->$"
)
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
#: Seconds one block may take (each runs once; the slowest is the split-training example).
BLOCK_TIMEOUT = 180
#: NOTES.txt scenarios (release splitserve, namespace ml): the default, and TLS with
#: mTLS and tokens, whose grpcurl and curl lines need the most to work as written.
NOTES_SCENARIOS = {
    "default": {},
    "tls-mtls-auth": {
        "tls": {"enabled": True, "secretName": "splitserve-tls", "clientCA": {"secretName": "splitserve-client-ca"}},
        "auth": {"tokenSecretName": "splitserve-tokens"},
    },
    "training": {
        "config": {"models": [{"name": "top", "spec": "/models/top.pt"}]},
        "modelSource": {"type": "pvc", "pvc": {"claimName": "models"}},
        "training": {"enabled": True, "models": ["top"]},
    },
}
SVC = "splitserve.ml.svc"
TOKEN = "docs-token-0123456789"


# ------------------------------------------------------------------ extracting


@dataclass
class Block:
    doc: str  # path relative to the checkout
    line: int  # of the opening fence
    lang: str
    text: str
    kind: str = "run"  # run | skip | cluster | fragment | values | output
    reason: str = ""
    expected_output: str | None = None  # the text block after it, marked as its output

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        j = i + 1
        while not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            j += 1
        text = textwrap.dedent("\n".join(lines[i + 1 : j]))
        block = Block(str(path.relative_to(ROOT)), i + 1, lang, text)
        prev = lines[i - 1].strip() if i else ""
        marker = MARKER.match(prev)
        if marker:
            block.kind = "output" if marker.group(1).startswith("output") else marker.group(1).split()[0]
            block.reason = marker.group(2).lstrip("—-: ").strip()
        if block.kind.startswith("continues"):
            # Runs after the block above, in one program (it uses what that one made).
            assert out and out[-1].lang == lang, f"{block.id}: continues no block of its language"
            block.text, block.kind = out[-1].text + "\n" + block.text, "run"
        if block.kind == "output":
            assert out and out[-1].expected_output is None, f"{block.id}: an output marker with no block above"
            out[-1].expected_output = block.text
        elif lang in RUN_LANGS or marker:
            out.append(block)
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks_of(doc)]


BLOCKS = all_blocks()


def test_every_marker_gives_a_reason_and_every_block_is_accounted_for():
    """Markers are explicit: a skip or a validation without its reason fails, and
    an unknown marker word is caught (it would otherwise look like a plain run)."""
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip().startswith("<!-- snippet"):
                assert MARKER.match(line.strip()), f"{doc.name}:{n}: unknown snippet marker {line.strip()!r}"
    for b in BLOCKS:
        if b.kind in ("skip", "cluster", "fragment"):
            assert len(b.reason) >= 10, f"{b.id}: `snippet: {b.kind}` needs a reason"
    runs = [b for b in BLOCKS if b.kind == "run"]
    assert len(runs) >= 10, [b.id for b in runs]


# ------------------------------------------------------------------ the world the blocks run in


def make_pki(d: Path) -> None:
    """CA, a server certificate for splitserve.ml.svc, localhost and 127.0.0.1, a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("docs CA")).issuer_name(name("docs CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn, usage, sans=None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), pem_key(key)

    server_crt, server_key = issue("splitserve", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName(SVC), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_crt, client_key = issue("docs client", ExtendedKeyUsageOID.CLIENT_AUTH)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.crt").write_bytes(server_crt)
    (d / "server.key").write_bytes(server_key)
    (d / "client.crt").write_bytes(client_crt)
    (d / "client.key").write_bytes(client_key)
    (d / "tokens").write_text(f"{TOKEN} infer\n")


@dataclass
class World:
    root: Path  # files every block may name
    stubs: Path
    plain: Server
    tls: Server
    env: dict[str, str] = field(default_factory=dict)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(server: Server, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(f"{server.metrics_url}/readyz"):
        assert server.proc.poll() is None, f"server exited:\n{server.output()}"
        assert time.monotonic() < deadline, f"server not ready:\n{server.log_so_far()[-3000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files and the two shared servers, made while each other start."""
    root = tmp_path_factory.mktemp("docs-world")
    make_pki(root)
    quiet = {"SPLITSERVE_WORKERS": "1", "SPLITSERVE_INTRA_OP_THREADS": "1", "SPLITSERVE_DEVICE": "cpu"}
    plain = Server("--model", "mlp=builtin:mlp:512x1024x512", "--model", "top=builtin:mlp:768x64x768",
                   "--warmup-shape", "top=1x768", env=quiet)
    tls = Server("--tls-cert", str(root / "server.crt"), "--tls-key", str(root / "server.key"),
                 "--tls-client-ca", str(root / "ca.crt"), "--auth-token-file", str(root / "tokens"), env=quiet)
    try:
        # What the blocks name: files, the example repository, the stubs.
        made = subprocess.Popen([sys.executable, str(ROOT / "examples" / "model_repository" / "make_models.py"),
                                 str(root / "models")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        shutil.copy(FIXTURES / "top.pt", root / "top.pt")
        shutil.copy(FIXTURES / "encoder.pt", root / "enc.pt")
        import torch

        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.ReLU())).save(str(root / "top_half.pt"))
        from grpc_tools import protoc

        stubs = root / "stubs"
        stubs.mkdir()
        proto = ROOT / "proto"
        assert protoc.main(["protoc", f"-I{proto}", f"--python_out={stubs}", f"--grpc_python_out={stubs}",
                            str(proto / "splitlearn" / "comm" / "compute_service.proto")]) == 0
        assert made.wait(timeout=120) == 0, made.stderr.read()
        wait_ready(plain)
        wait_ready(tls)
        env = dict(os.environ)
        env.update(quiet)
        env.update({
            "PATH": f"{BIN.parent}:{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
            "PYTHONPATH": str(stubs),
            "TOKEN": TOKEN,
            # Nothing of the test's own environment names another server.
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        })
        yield World(root, stubs, plain, tls, env)
    finally:
        for s in (plain, tls):
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


#: Cluster addresses the docs use -> the shared server that stands in for them.
def hosts(w: World) -> list[tuple[str, str]]:
    p, t = w.plain, w.tls
    return [
        ("http://top-predictor.models.svc/", f"http://127.0.0.1:{p.http_port}/"),
        ("top-predictor.models.svc:8081", f"127.0.0.1:{p.port}"),
        ("top-predictor.models.svc:80", f"127.0.0.1:{p.http_port}"),
        ("splitserve-host:50051", f"127.0.0.1:{p.port}"),
        (f"{SVC}:50051", f"127.0.0.1:{t.port}"),
    ]


def starts_server(text: str) -> bool:
    return bool(re.search(r"splitserve serve\b", text))


def foreground_server(text: str) -> bool:
    """A block whose `serve` runs in the foreground: it serves until stopped."""
    lines = " ".join(l.rstrip("\\").strip() for l in text.splitlines() if not l.strip().startswith("#"))
    return starts_server(text) and not re.search(r"splitserve serve\b[^;&|]*&(?!&)", lines)


@dataclass
class Outcome:
    ok: bool
    detail: str
    seconds: float


def sandbox(w: World, name: str) -> Path:
    d = w.root / "blocks" / re.sub(r"[^\w.-]", "_", name)
    d.mkdir(parents=True)
    for sub in ("target", ".venv", "tests", "examples", "proto", "helm", "deploy", "scripts", "dashboards"):
        (d / sub).symlink_to(ROOT / sub)
    for f in ("top_half.pt", "top.pt", "enc.pt", "ca.crt", "client.crt", "client.key"):
        (d / f).symlink_to(w.root / f)
    shutil.copytree(w.root / "models", d / "models", symlinks=True)
    (d / "tmp").mkdir()
    return d


def adapt(w: World, text: str, box: Path, own_ports: dict[str, int] | None) -> str:
    """The block as written, with the addresses and paths of this machine."""
    for host, local in hosts(w):
        text = text.replace(host, local)
    grpc_port = own_ports["grpc"] if own_ports else w.plain.port
    text = re.sub(r"\b(127\.0\.0\.1|localhost):50051\b", f"127.0.0.1:{grpc_port}", text)
    text = re.sub(r"(?<![\w./])/tmp/", f"{box}/tmp/", text)
    return text


#: `make build fixtures`: make test has built both before this test runs.
MAKE_SHIM = """make() {
  for t in "$@"; do case "$t" in build|fixtures) ;; *) echo "make $t: not run by the docs test" >&2; return 1;; esac; done
  test -x target/release/splitserve && test -f tests/fixtures/generated/top.pt
}
"""


def run_block(w: World, b: Block) -> Outcome:
    started = time.monotonic()
    box = sandbox(w, b.id)
    env = dict(w.env)
    own = None
    if b.lang != "python" and starts_server(b.text):
        own = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
        env.update({"SPLITSERVE_GRPC_ADDR": f"127.0.0.1:{own['grpc']}",
                    "SPLITSERVE_HTTP_ADDR": f"127.0.0.1:{own['http']}",
                    "SPLITSERVE_METRICS_ADDR": f"127.0.0.1:{own['metrics']}"})
    text = adapt(w, b.text, box, own)
    if b.lang == "python":
        script = box / "snippet.py"
        script.write_text(text)
        cmd = [sys.executable, str(script)]
    else:
        script = box / "snippet.sh"
        script.write_text("set -e\n" + MAKE_SHIM + text + "\n")
        cmd = ["bash", str(script)]
    proc = subprocess.Popen(cmd, cwd=box, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        if own and foreground_server(b.text):
            # Serves until stopped: ready is the pass; then SIGTERM.
            metrics = re.search(r"--metrics-addr[ =](\S+)", text)
            url = f"http://{metrics.group(1) if metrics else env['SPLITSERVE_METRICS_ADDR']}/readyz"
            deadline = time.monotonic() + BLOCK_TIMEOUT
            while not http_ok(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.communicate(timeout=10)[0] if proc.poll() is not None else "(timed out)"
                    return Outcome(False, f"the server never became ready:\n{out[-3000:]}", time.monotonic() - started)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGTERM)
            out = proc.communicate(timeout=60)[0]
            return Outcome(True, out, time.monotonic() - started)
        out = proc.communicate(timeout=BLOCK_TIMEOUT)[0]
        ok = proc.returncode == 0
        detail = out
        if ok and b.expected_output is not None:
            want = adapt(w, b.expected_output, box, own).strip("\n")
            if want not in out:
                ok, detail = False, f"prints something else than the doc says:\n--- doc\n{want}\n--- printed\n{out}"
        elif not ok:
            detail = f"exit {proc.returncode}:\n{out[-4000:]}"
        return Outcome(ok, detail, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"still running after {BLOCK_TIMEOUT} s", time.monotonic() - started)
    finally:
        # Whatever the block left running (a server it started with &).
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ NOTES.txt


def render_deploy():
    spec = importlib.util.spec_from_file_location("render_deploy", ROOT / "scripts" / "render_deploy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_deploy", module)
    spec.loader.exec_module(module)
    return module


@dataclass
class NotesLine:
    scenario: str
    text: str
    objects: list

    @property
    def id(self) -> str:
        return f"NOTES[{self.scenario}]: {self.text}"


COMMAND = re.compile(r"^ {5}(kubectl|helm|grpcurl|curl|python)\b(.*)$")


def notes_lines() -> list[NotesLine]:
    rd = render_deploy()
    out = []
    for scenario, values in NOTES_SCENARIOS.items():
        rendered = rd.render_chart(values, name="splitserve", namespace="ml")
        objs = [o for _, o in rd.manifests(rendered)]
        for line in rendered["splitserve/templates/NOTES.txt"].splitlines():
            if COMMAND.match(line):
                out.append(NotesLine(scenario, line.strip(), objs))
    return out


def validate_notes_kubectl(line: NotesLine) -> None:
    """A kubectl or helm line of NOTES names objects the chart renders."""
    words = shlex.split(line.text)
    by_kind = {(o["kind"], o["metadata"]["name"]) for o in line.objects}
    if words[0] == "helm":
        assert words[1] == "test" and words[2] == "splitserve", line.text
        assert any(o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test" for o in line.objects)
        return
    assert words[:3] == ["kubectl", "-n", "ml"], line.text
    if words[3] == "rollout":
        kind, name = words[5].split("/")
        assert ("Deployment", name) in by_kind, line.text
    elif words[3] == "port-forward":
        kind, name = words[4].split("/")
        svc = next(o for o in line.objects if o["kind"] == "Service" and o["metadata"]["name"] == name)
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        for pair in words[5:]:
            local, remote = pair.split(":")
            assert ports.get(remote) == int(local), (pair, ports)
    else:
        raise AssertionError(f"a kubectl line the docs test does not know how to check: {line.text}")


def run_notes_line(w: World, line: NotesLine) -> Outcome:
    """grpcurl, curl and python lines, against the shared server of the scenario."""
    started = time.monotonic()
    tls = line.scenario.startswith("tls")
    server = w.tls if tls else w.plain
    text = line.text.replace(":50051", f":{server.port}").replace(":8000", f":{server.http_port}")
    text = text.replace(f"{SVC}:{server.http_port}:localhost", f"{SVC}:{server.http_port}:127.0.0.1")
    box = sandbox(w, f"notes-{line.scenario}-{abs(hash(line.text))}")
    proc = subprocess.run(["bash", "-c", "set -e -o pipefail\n" + text], cwd=box, env=w.env, capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and out.strip() != ""
    return Outcome(ok, f"exit {proc.returncode}:\n{out[-3000:]}" if not ok else out, time.monotonic() - started)


# ------------------------------------------------------------------ running them all


@pytest.fixture(scope="module")
def outcomes(world):
    """Every runnable block and NOTES line, run concurrently; their outcomes by id."""
    started = time.monotonic()
    lines = notes_lines()
    jobs = {b.id: (run_block, b) for b in BLOCKS if b.kind == "run"}
    for line in lines:
        if line.text.startswith(("kubectl", "helm")):
            continue
        assert line.id not in jobs, f"two NOTES lines share an id: {line.id}"
        jobs[line.id] = (run_notes_line, line)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {k: pool.submit(fn, world, arg) for k, (fn, arg) in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    elapsed = time.monotonic() - started
    slowest = sorted(results.items(), key=lambda kv: -kv[1].seconds)[:3]
    print(f"\ndocs: {len(results)} blocks and NOTES lines ran in {elapsed:.1f} s; slowest: "
          + ", ".join(f"{k} {o.seconds:.1f} s" for k, o in slowest))
    return results, lines


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block(block: Block, outcomes, tmp_path):
    results, _ = outcomes
    if block.kind == "skip":
        pytest.skip(f"{block.id}: {block.reason}")
    if block.kind == "fragment":
        if block.lang == "python":
            ast.parse(block.text)
        else:
            r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        return
    if block.kind in ("cluster", "values"):
        validate_cluster_block(block, tmp_path)
        return
    outcome = results[block.id]
    assert outcome.ok, f"{block.id} ({block.lang}) fails as written: {outcome.detail}"


def test_notes_lines_run_or_name_what_the_chart_renders(outcomes):
    results, lines = outcomes
    assert {l.scenario for l in lines} == set(NOTES_SCENARIOS)
    kinds = {l.text.split()[0] for l in lines}
    assert {"kubectl", "helm", "grpcurl", "curl", "python"} <= kinds, kinds
    failures = []
    for line in lines:
        if line.text.startswith(("kubectl", "helm")):
            validate_notes_kubectl(line)
            continue
        outcome = results[line.id]
        if not outcome.ok:
            failures.append(f"{line.id}\n  {line.text}\n  {outcome.detail}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ cluster blocks: rendered, validated


def helm_values(words: list[str]) -> dict:
    """The values of `helm install/upgrade ... --set a.b=c --set 'l={x}' --set 'm[0].n=v'`."""
    values: dict = {}
    it = iter(words)
    for w in it:
        if w != "--set":
            continue
        key, _, raw = next(it).partition("=")
        value = [v for v in raw.strip("{}").split(",")] if raw.startswith("{") else (
            True if raw == "true" else False if raw == "false" else raw)
        node = values
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", key)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = parts[i + 1] if not last else None
            if part.startswith("["):
                idx = int(part[1:-1])
                while len(node) <= idx:
                    node.append({})
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if nxt.startswith("[") else {})
    return values


def validate_cluster_block(block: Block, tmp_path: Path) -> None:
    import yaml

    rd = render_deploy()
    if block.lang in ("sh", "bash", "shell"):
        r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert r.returncode == 0, f"{block.id}: {r.stderr}"
    if block.kind == "values" or block.lang == "yaml":
        rd.render_chart(yaml.safe_load(block.text), name="splitserve", namespace="ml")
        return
    commands = " ".join(l.rstrip("\\").strip() for l in block.text.splitlines()
                        if l.strip() and not l.strip().startswith("#"))
    checked = 0
    for command in re.split(r"(?<=[^\\])\s*(?=\b(?:helm|kubectl) )", commands):
        words = shlex.split(command.split("#")[0])
        if words[:2] in (["helm", "install"], ["helm", "upgrade"]):
            assert "./helm/splitserve" in words, command
            rd.render_chart(helm_values(words), name=words[words.index("./helm/splitserve") - 1], namespace="ml")
            checked += 1
        elif words[:2] == ["kubectl", "apply"] and "-k" in words:
            target = words[words.index("-k") + 1]
            kubectl = Path(sys.executable).parent / "kubectl"
            r = subprocess.run([str(kubectl if kubectl.exists() else "kubectl"), "kustomize", str(ROOT / target)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            checked += 1
    assert checked or block.kind == "cluster", block.id

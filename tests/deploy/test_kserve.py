"""KServe: the ServingRuntime and the example InferenceService in deploy/kserve/,
and the chart's kserve.servingRuntime switch that renders the runtime.

What a KServe user would notice: KServe picks the runtime for a `pytorch` model
on the v2 protocol, the server serves the file KServe mounts under /mnt/models
under the InferenceService's name, REST arrives on 8080 and gRPC on 8081, the
pod runs locked down, and every field is one KServe knows. The objects are read
into the KServe Python SDK's own models (kserve.V1alpha1ServingRuntime,
kserve.V1beta1InferenceService, with the Kubernetes types inside them) by
kserve_sdk.py under .venv-kserve: an unknown field, a wrong type or a missing
required field fails.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils as kv
import pytest
import yaml

from deploy_support import (
    render_values,
    CHART, HERE, ROOT, VALUE_SETS, env_of, kubectl, objects, one, render_deploy, server_container,
)

KSERVE_DIR = ROOT / "deploy" / "kserve"
KSERVE_PY = ROOT / ".venv-kserve" / "bin" / "python"
KUBE_VERSIONS = ["1.30.0", kv.latest_version()]
SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE_DIR / name).read_text(encoding="utf-8")) if d]
    return doc


def sdk(*requests: dict[str, Any]) -> list[dict[str, Any]]:
    """kserve_sdk.py's answer for each {"object": ..., "get": [...]}."""
    if not KSERVE_PY.exists():
        pytest.fail("the KServe SDK is missing: run bash scripts/setup-deploy-tools.sh (it makes .venv-kserve)")
    proc = subprocess.run(
        [str(KSERVE_PY), str(HERE / "kserve_sdk.py")],
        input=json.dumps(list(requests)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _contained(want: Any, got: Any, path: str = "") -> list[str]:
    """Where `got` (the SDK's serialisation) lost or changed something of `want`."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r}"]
        return [p for k, v in want.items() for p in _contained(v, got.get(k), f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r}"]
        return [p for i, (w, g) in enumerate(zip(want, got)) for p in _contained(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {want!r} != {got!r}"]


def _typed(obj: dict[str, Any], *paths: str) -> dict[str, Any]:
    """Read `obj` into its SDK class; fail on any error; the attribute paths asked for."""
    (answer,) = sdk({"object": obj, "get": list(paths)})
    assert not answer["errors"], "\n".join(answer["errors"])
    assert not _contained(obj, answer["roundtrip"]), _contained(obj, answer["roundtrip"])
    return answer


def _container(runtime: dict[str, Any]) -> dict[str, Any]:
    (c,) = runtime["spec"]["containers"]
    return c


def _env_values(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v.get("value") for k, v in env_of(c).items()}


def _kserve_go_template(c: dict[str, Any], name: str) -> dict[str, Any]:
    """What KServe does to the runtime's container for an InferenceService: it parses
    the container's JSON as a Go template and executes it with the object's metadata."""
    text = json.dumps(c)
    placeholders = set(re.findall(r"\{\{.*?\}\}", text))
    assert placeholders <= {"{{.Name}}"}, f"templates KServe cannot fill in: {placeholders}"
    return json.loads(text.replace("{{.Name}}", name))


def _kserve_go_template_runtime(runtime: dict[str, Any]) -> dict[str, Any]:
    runtime = copy.deepcopy(runtime)
    runtime["spec"]["containers"] = [_kserve_go_template(c, "top") for c in runtime["spec"]["containers"]]
    return runtime


# ------------------------------------------------------------------ deploy/kserve read by the KServe SDK


def test_serving_runtime_is_a_kserve_sdk_serving_runtime() -> None:
    runtime = _load("servingruntime.yaml")
    answer = _typed(
        runtime,
        "spec.supported_model_formats[0].name",
        "spec.supported_model_formats[0].auto_select",
        "spec.protocol_versions",
        "spec.containers[0].name",
        "spec.containers[0].ports",
        "spec.containers[0].security_context.run_as_non_root",
    )
    assert answer["class"] == "V1alpha1ServingRuntime"
    assert answer["get"] == {
        "spec.supported_model_formats[0].name": "pytorch",
        "spec.supported_model_formats[0].auto_select": True,
        "spec.protocol_versions": ["v2", "grpc-v2"],
        "spec.containers[0].name": "kserve-container",
        "spec.containers[0].ports": [
            {"name": "http1", "containerPort": 8080, "protocol": "TCP"},
            {"name": "h2c", "containerPort": 8081, "protocol": "TCP"},
        ],
        "spec.containers[0].security_context.run_as_non_root": True,
    }


def test_inference_service_is_a_kserve_sdk_inference_service() -> None:
    isvc = _load("inferenceservice.yaml")
    answer = _typed(
        isvc,
        "spec.predictor.model.model_format.name",
        "spec.predictor.model.protocol_version",
        "spec.predictor.model.runtime",
        "spec.predictor.model.storage_uri",
    )
    assert answer["class"] == "V1beta1InferenceService"
    got = answer["get"]
    assert got["spec.predictor.model.model_format.name"] == "pytorch"
    assert got["spec.predictor.model.protocol_version"] == "v2"
    assert got["spec.predictor.model.runtime"] == _load("servingruntime.yaml")["metadata"]["name"]
    assert got["spec.predictor.model.storage_uri"].endswith("/model.pt")


def test_sdk_check_rejects_what_kserve_would_not_know() -> None:
    """The SDK check is not a no-op: misspelt fields, wrong types and missing names fail."""
    runtime = _load("servingruntime.yaml")
    misspelt = copy.deepcopy(runtime)
    misspelt["spec"]["supportedModelFormat"] = misspelt["spec"].pop("supportedModelFormats")
    wrong_type = copy.deepcopy(runtime)
    _container(wrong_type)["ports"][0]["containerPort"] = "8080"
    nameless = copy.deepcopy(runtime)
    del _container(nameless)["name"]
    isvc = copy.deepcopy(_load("inferenceservice.yaml"))
    isvc["spec"]["predictor"]["model"]["protocolversion"] = isvc["spec"]["predictor"]["model"].pop("protocolVersion")
    answers = sdk(*({"object": o} for o in (misspelt, wrong_type, nameless, isvc)))
    expected = ["spec.supportedModelFormat", "ports[0]", "containers[0]", "protocolversion"]
    for answer, where in zip(answers, expected):
        assert any(where in e for e in answer["errors"]), (where, answer["errors"])


# ------------------------------------------------------------------ what the runtime does


def test_runtime_serves_the_mounted_model_under_the_inference_service_name() -> None:
    runtime = _load("servingruntime.yaml")
    isvc = _load("inferenceservice.yaml")
    c = _container(runtime)
    assert c["args"] == ["serve"]
    env = _env_values(c)
    assert env["SPLITSERVE_MODEL"] == "{{.Name}}=/mnt/models/model.pt"
    # As KServe fills it in for the example: the model is called after the InferenceService.
    filled = _env_values(_kserve_go_template(c, isvc["metadata"]["name"]))
    assert filled["SPLITSERVE_MODEL"] == "top=/mnt/models/model.pt"
    # The storage initializer copies a file URI to /mnt/models/<basename>.
    assert isvc["spec"]["predictor"]["model"]["storageUri"].rsplit("/", 1)[1] == "model.pt"


def test_runtime_ports_are_kserves() -> None:
    c = _container(_load("servingruntime.yaml"))
    env = _env_values(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The first port gets KServe's REST traffic; h2c is gRPC (v2 over gRPC).
    assert c["ports"][0]["name"] == "http1"
    assert ports == {"http1": 8080, "h2c": 8081}
    assert env["SPLITSERVE_HTTP_ADDR"] == "0.0.0.0:8080"
    assert env["SPLITSERVE_GRPC_ADDR"] == "0.0.0.0:8081"
    metrics = int(env["SPLITSERVE_METRICS_ADDR"].rsplit(":", 1)[1])
    assert metrics not in ports.values()
    spec = _load("servingruntime.yaml")["spec"]
    assert spec["annotations"] == {"prometheus.kserve.io/port": str(metrics), "prometheus.kserve.io/path": "/metrics"}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": 8080}, probe


def test_runtime_runs_locked_down_with_its_cpu_limit() -> None:
    runtime = _load("servingruntime.yaml")
    c = _container(runtime)
    assert SECURITY.items() <= c["securityContext"].items()
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    (tmp,) = [v for v in runtime["spec"]["volumes"] if v["name"] == mounts["/tmp"]]
    assert "emptyDir" in tmp
    ref = env_of(c)["SPLITSERVE_CPU_LIMIT"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "kserve-container", "resource": "limits.cpu", "divisor": "1"}
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    # No namespace: it goes where it is applied, next to the InferenceServices.
    assert "namespace" not in runtime["metadata"]
    # The Deployment's Secrets are not there: no TLS, tokens or trainable models.
    assert not [n for n in env_of(c) if n.startswith(("SPLITSERVE_TLS", "SPLITSERVE_AUTH", "SPLITSERVE_TRAINABLE"))]


def _as_pod(runtime: dict[str, Any]) -> dict[str, Any]:
    """The runtime's pod template as a Pod, for the Kubernetes schemas."""
    spec = runtime["spec"]
    pod_spec = {k: spec[k] for k in ("containers", "volumes", "imagePullSecrets", "nodeSelector", "tolerations") if k in spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}, "spec": pod_spec}


@pytest.mark.parametrize("source", ["deploy", "all"])
def test_runtime_pod_validates_against_kubernetes(source: str) -> None:
    runtime = _load("servingruntime.yaml") if source == "deploy" else one(objects("all"), "ServingRuntime")
    pod = _as_pod(_kserve_go_template_runtime(runtime))
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_kustomization_applies_only_the_runtime() -> None:
    kustomization = _load("kustomization.yaml")
    assert kustomization["resources"] == ["servingruntime.yaml"]
    proc = subprocess.run([kubectl(), "kustomize", str(KSERVE_DIR)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (got,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert got == _load("servingruntime.yaml")
    assert sorted(p.name for p in KSERVE_DIR.iterdir()) == [
        "inferenceservice-keda.yaml",
        "inferenceservice.yaml",
        "kustomization.yaml",
        "servingruntime.yaml",
    ]


# ------------------------------------------------------------------ the chart's switch


def test_chart_renders_no_serving_runtime_by_default() -> None:
    for key in ("default", "gpu"):
        assert not [o for o in objects(key) if o["kind"] == "ServingRuntime"], key


def test_chart_serving_runtime_is_what_deploy_kserve_holds(chart) -> None:
    objs = render_values(chart, render_deploy.KSERVE_VALUES)
    runtime = one(objs, "ServingRuntime")
    assert runtime["metadata"]["namespace"] == "ml"
    assert runtime["metadata"]["labels"]["app.kubernetes.io/component"] == "kserve-runtime"
    plain = _load("servingruntime.yaml")
    assert runtime["spec"] == plain["spec"]
    # The runtime runs the Deployment's image.
    assert _container(runtime)["image"] == server_container(one(objs, "Deployment"))["image"]


def test_chart_serving_runtime_with_every_option() -> None:
    objs = objects("all")
    runtime = one(objs, "ServingRuntime")
    answer = _typed(runtime, "spec.containers[0].env")
    assert answer["class"] == "V1alpha1ServingRuntime"
    assert runtime["metadata"]["name"] == "splitserve-pytorch"
    assert runtime["metadata"]["annotations"] == {"example.com/owner": "ml-platform"}
    c = _container(runtime)
    env = _env_values(c)
    assert env["SPLITSERVE_MODEL"] == "{{.Name}}=/mnt/models/top/model.pt"
    assert env["SPLITSERVE_WARMUP_SHAPE"] == "{{.Name}}=1x4+1x4"
    assert _env_values(_kserve_go_template(c, "pair"))["SPLITSERVE_WARMUP_SHAPE"] == "pair=1x4+1x4"
    # extraEnv adds and replaces; config's server settings and limits apply as in the Deployment.
    assert env["RUST_LOG"] == "info" and env["SPLITSERVE_LOG_FORMAT"] == "text"
    assert env["SPLITSERVE_MAX_CONNECTIONS"] == "256" and env["SPLITSERVE_WORKERS"] == "2"
    # The Deployment's TLS, tokens and trainable models are not the runtime's.
    assert not [n for n in env if n.startswith(("SPLITSERVE_TLS", "SPLITSERVE_AUTH", "SPLITSERVE_TRAINABLE"))]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert c["image"] == server_container(one(objs, "Deployment"))["image"]
    assert runtime["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert SECURITY.items() <= c["securityContext"].items()


def test_chart_serving_runtime_for_knative_declares_one_port(chart) -> None:
    """Knative (serverless) mode takes one port per container: grpcPort null."""
    values = {"kserve": {"servingRuntime": {"enabled": True, "grpcPort": None}}}
    runtime = one(render_values(chart, values), "ServingRuntime")
    c = _container(runtime)
    assert c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "SPLITSERVE_GRPC_ADDR" not in env_of(c)
    assert _typed(runtime)["class"] == "V1alpha1ServingRuntime"


def test_chart_serving_runtime_on_gpus(chart) -> None:
    values = {**VALUE_SETS["gpu"], "kserve": {"servingRuntime": {"enabled": True}}}
    runtime = one(render_values(chart, values), "ServingRuntime")
    c = _container(runtime)
    assert c["image"].endswith(":0.1.0-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "16Gi"
    env = _env_values(c)
    assert env["SPLITSERVE_DEVICE"] == "cuda" and env["CUDA_CACHE_PATH"].startswith("/tmp/")
    assert runtime["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in runtime["spec"]["tolerations"]
    _typed(runtime)
    kubernetes_validate.validate(_as_pod(_kserve_go_template_runtime(runtime)), KUBE_VERSIONS[-1], strict=True)


def test_docs_describe_the_runtime() -> None:
    doc = (ROOT / "docs" / "kserve.md").read_text(encoding="utf-8")
    for needle in ("deploy/kserve", "kserve.servingRuntime.enabled", "/mnt/models/model.pt", "8080", "8081", "grpc-v2"):
        assert needle in doc, needle
    assert "docs/kserve.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_keda_example_is_a_kserve_sdk_inference_service_scaled_on_queue_depth() -> None:
    """deploy/kserve/inferenceservice-keda.yaml: KServe's KEDA autoscaler class in
    Standard mode, a Prometheus metric on the queue depth, every field one the
    SDK knows, and otherwise the plain example."""
    isvc = _load("inferenceservice-keda.yaml")
    answer = _typed(
        isvc,
        "spec.predictor.min_replicas",
        "spec.predictor.max_replicas",
        "spec.predictor.auto_scaling.metrics[0].type",
        "spec.predictor.auto_scaling.metrics[0].external.metric.backend",
        "spec.predictor.auto_scaling.metrics[0].external.metric.query",
        "spec.predictor.auto_scaling.metrics[0].external.target.type",
    )
    assert answer["class"] == "V1beta1InferenceService"
    got = answer["get"]
    assert isvc["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "RawDeployment",
        "serving.kserve.io/autoscalerClass": "keda",
    }
    assert (got["spec.predictor.min_replicas"], got["spec.predictor.max_replicas"]) == (1, 10)
    assert got["spec.predictor.auto_scaling.metrics[0].type"] == "External"
    assert got["spec.predictor.auto_scaling.metrics[0].external.metric.backend"] == "prometheus"
    assert "nv_inference_pending_request_count" in got["spec.predictor.auto_scaling.metrics[0].external.metric.query"]
    assert got["spec.predictor.auto_scaling.metrics[0].external.target.type"] == "AverageValue"
    plain = _load("inferenceservice.yaml")
    assert isvc["spec"]["predictor"]["model"] == plain["spec"]["predictor"]["model"]
    # The runtime is scraped where the query looks.
    annotations = _load("servingruntime.yaml")["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"

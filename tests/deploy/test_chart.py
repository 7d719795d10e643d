"""The Helm chart (helm/splitserve) and the manifests rendered from it (deploy/).

What a user would notice: the probes hit the right gRPC services (HTTP on the
admin port once the gRPC port speaks TLS), the thread plan follows the pod's CPU
limit, pods get time to drain, the pods run locked down, TLS, client
certificates, tokens and limits reach the server, connections are aged out so
that load spreads over new pods (and a headless Service serves clients that
balance themselves), training runs in one pod that checkpoints to a writable
volume and is never scaled out, the HTTP/REST (Open Inference Protocol) port is
exposed like the gRPC one, the NetworkPolicy admits only the listed peers, GPU
values really ask for a GPU, Grafana finds the dashboard, a typo or a
contradiction in the values is an error, and deploy/ matches the chart. The KServe ServingRuntime has its own file, test_kserve.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import kubernetes_validate.utils as kv
import pytest
import yaml

from deploy_support import (
    CHART,
    DASHBOARDS,
    ROOT,
    VALUE_SETS,
    env_of,
    kubectl,
    objects,
    one,
    render_deploy,
    render_values,
    rendered,
    server_container,
)

#: Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
#: that kubernetes-validate knows.
KUBE_VERSIONS = ["1.30.0", kv.latest_version()]
#: Custom resources (prometheus-operator, KServe) and their apiVersion:
#: kubernetes-validate has no schema for them.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "ScaledObject": "keda.sh/v1alpha1",
}
ALL_SETS = sorted(VALUE_SETS)


# ------------------------------------------------------------------ lint, render, validate


@pytest.mark.parametrize("key", ALL_SETS)
def test_chart_lints_strict(key: str) -> None:
    report = helm_python.lint(
        str(CHART), values=VALUE_SETS[key], strict=True, kube_version=f"v{KUBE_VERSIONS[0]}"
    )
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not serious, json.dumps(report, indent=2)


@pytest.mark.parametrize("key", ALL_SETS)
def test_every_manifest_validates_against_kubernetes(key: str) -> None:
    objs = objects(key)
    assert objs
    checked = set()
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_KINDS:
            # No schema for CRDs: check the envelope here, the contents in their own tests.
            assert obj["apiVersion"] == CRD_KINDS[obj["kind"]], where
            assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "ml", where
            assert isinstance(obj.get("spec"), dict) and obj["spec"], where
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{where} invalid for Kubernetes {version} at {path}: {e.message}")
        checked.add(obj["kind"])
    assert {"Deployment", "Service", "ServiceAccount", "Pod"} <= checked


def test_validator_rejects_an_unknown_field() -> None:
    """Strict validation is not a no-op: a misplaced field fails it."""
    dep = copy.deepcopy(one(objects("default"), "Deployment"))
    server_container(dep)["livenessprobe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


def test_every_template_renders_with_all_options() -> None:
    """values-all.yaml switches on every optional template."""
    kinds = {o["kind"] for o in objects("all")}
    assert kinds >= {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "Pod",
        "ServingRuntime",
    }
    assert "splitserve/templates/NOTES.txt" in rendered("all")


def test_default_values_render_only_the_core_objects() -> None:
    kinds = sorted(o["kind"] for o in objects("default"))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]


# ------------------------------------------------------------------ probes and lifecycle


def _tls_on(key: str) -> bool:
    return bool(VALUE_SETS[key].get("tls", {}).get("enabled"))


@pytest.mark.parametrize("key", ALL_SETS)
def test_probes_use_the_health_endpoints(key: str) -> None:
    c = server_container(one(objects(key), "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if _tls_on(key):
        # The kubelet's gRPC probes cannot speak TLS: HTTP on the admin port instead.
        for probe in ("startupProbe", "readinessProbe"):
            assert "grpc" not in c[probe], probe
            assert c[probe]["httpGet"] == {"path": "/readyz", "port": ports["metrics"]}, probe
        assert "grpc" not in c["livenessProbe"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": ports["metrics"]}
    else:
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": ports["grpc"], "service": "splitlearn.comm.ComputeService"}, probe
        assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    # Startup must allow for loading and warming up the models.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_value_sets_cover_both_probe_kinds() -> None:
    assert {_tls_on(key) for key in ALL_SETS} == {True, False}


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"([0-9]+)(ms|s|m|h)?", duration)
    assert m, duration
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]
    return int(m.group(1)) * scale


@pytest.mark.parametrize("key", ALL_SETS)
def test_termination_grace_covers_the_drain(key: str) -> None:
    dep = one(objects(key), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    grace = _seconds(env_of(c)["SPLITSERVE_SHUTDOWN_GRACE"]["value"])
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 10


def test_termination_grace_follows_the_configured_grace() -> None:
    # values-all: preStop 10 s + shutdownGrace 2m + padding 20 s.
    pod = one(objects("all"), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 120 + 20
    assert one(objects("default"), "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] == 5 + 30 + 15


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("key", ALL_SETS)
def test_cpu_limit_comes_from_the_downward_api(key: str) -> None:
    c = server_container(one(objects(key), "Deployment"))
    ref = env_of(c)["SPLITSERVE_CPU_LIMIT"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    assert "cpu" in c["resources"]["limits"], "the default thread plan needs a CPU limit"


def test_default_env_configures_the_server() -> None:
    dep = one(objects("default"), "Deployment")
    c = server_container(dep)
    env = {k: v.get("value") for k, v in env_of(c).items()}
    assert c["args"] == ["serve"]
    assert env["SPLITSERVE_GRPC_ADDR"] == "0.0.0.0:50051"
    assert env["SPLITSERVE_HTTP_ADDR"] == "0.0.0.0:8000"
    assert env["SPLITSERVE_METRICS_ADDR"] == "0.0.0.0:9090"
    assert env["SPLITSERVE_MODEL"] == "mlp=builtin:mlp:512x1024x512"
    assert env["SPLITSERVE_DEVICE"] == "cpu"
    assert env["SPLITSERVE_WORKERS"] == "auto"
    assert env["SPLITSERVE_INTRA_OP_THREADS"] == "auto"
    assert env["SPLITSERVE_LOG_FORMAT"] == "json"
    assert env["SPLITSERVE_SHUTDOWN_GRACE"] == "30s"
    assert "SPLITSERVE_OTLP_ENDPOINT" not in env and "SPLITSERVE_ACCESS_LOG" not in env
    # Inference: connections are aged out, so clients reconnect and spread over new pods.
    assert env["SPLITSERVE_MAX_CONNECTION_AGE"] == "5m"
    assert env["SPLITSERVE_MAX_CONNECTION_AGE_GRACE"] == "30s"
    # Nothing trainable, no TLS, no tokens, and the binary's own limits.
    for name in ("SPLITSERVE_AUTH_TOKEN_FILE", *TRAINING_ENV, *LIMIT_ENV.values()):
        assert name not in env, name
    assert not any(name.startswith("SPLITSERVE_TLS_") for name in env)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "http": 8000, "metrics": 9090}
    # Built-in model: no model volume.
    assert [v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]] == ["tmp"]
    assert "initContainers" not in dep["spec"]["template"]["spec"]


def test_all_options_env() -> None:
    c = server_container(one(objects("all"), "Deployment"))
    env = env_of(c)  # also asserts that no name appears twice
    value = {k: v.get("value") for k, v in env.items()}
    assert value["SPLITSERVE_MODEL"] == "enc=/models/enc.pt,scale=builtin:scale:2"
    assert value["SPLITSERVE_WARMUP_SHAPE"] == "enc=1x64x256"
    assert value["SPLITSERVE_MAX_BATCH_SIZE"] == "8,enc=16"
    assert value["SPLITSERVE_BATCH_TIMEOUT_US"] == "1000,enc=500"
    # Large numbers stay digits (values arrive as floats in templates).
    assert value["SPLITSERVE_QUEUE_CAPACITY"] == "1000000"
    assert value["SPLITSERVE_MAX_MESSAGE_BYTES"] == "104857600"
    assert value["SPLITSERVE_WORKERS"] == "2"
    assert value["SPLITSERVE_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert value["SPLITSERVE_ACCESS_LOG"] == "true"  # config.accessLog (docs/runbooks.md, `invalid`)
    assert value["RUST_LOG"] == "info,splitserve=debug"
    assert "fieldRef" in env["OTEL_SERVICE_NAME"]["valueFrom"]
    # extraEnv replaces the chart's own value instead of duplicating it.
    assert value["SPLITSERVE_LOG_FORMAT"] == "text"
    assert value["SPLITSERVE_MAX_CONNECTION_AGE"] == "10m"
    assert value["SPLITSERVE_MAX_CONNECTION_AGE_GRACE"] == "1m"
    # Inference with several replicas and an HPA: nothing is trained.
    assert not TRAINING_ENV & value.keys()


#: Variables only the training pod gets.
TRAINING_ENV = {
    "SPLITSERVE_TRAINABLE",
    "SPLITSERVE_OPTIMIZER",
    "SPLITSERVE_LEARNING_RATE",
    "SPLITSERVE_MOMENTUM",
    "SPLITSERVE_WEIGHT_DECAY",
    "SPLITSERVE_ADAM_BETAS",
    "SPLITSERVE_ADAM_EPS",
    "SPLITSERVE_CHECKPOINT_DIR",
    "SPLITSERVE_CHECKPOINT_EVERY",
    "SPLITSERVE_CHECKPOINT_KEEP",
    "SPLITSERVE_ACTIVATION_CACHE_BYTES",
    "SPLITSERVE_ACTIVATION_TTL",
}


#: config.limits key -> the variable the server reads.
LIMIT_ENV = {
    "maxConnections": "SPLITSERVE_MAX_CONNECTIONS",
    "maxConcurrentStreams": "SPLITSERVE_MAX_CONCURRENT_STREAMS",
    "requestBodyTimeout": "SPLITSERVE_REQUEST_BODY_TIMEOUT",
    "maxInflightBytes": "SPLITSERVE_MAX_INFLIGHT_BYTES",
    "maxDecompressedBytes": "SPLITSERVE_MAX_DECOMPRESSED_BYTES",
    "idleConnectionTimeout": "SPLITSERVE_IDLE_CONNECTION_TIMEOUT",
    "maxLearningRate": "SPLITSERVE_MAX_LEARNING_RATE",
    "maxAccumulationSteps": "SPLITSERVE_MAX_ACCUMULATION_STEPS",
}


def test_every_limit_reaches_the_server() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert set(values["config"]["limits"]) == set(LIMIT_ENV), "a limit without its variable in LIMIT_ENV"
    env = {k: v.get("value") for k, v in env_of(server_container(one(objects("all"), "Deployment"))).items()}
    assert {LIMIT_ENV[k]: env.get(LIMIT_ENV[k]) for k in LIMIT_ENV} == {
        "SPLITSERVE_MAX_CONNECTIONS": "256",
        "SPLITSERVE_MAX_CONCURRENT_STREAMS": "64",
        "SPLITSERVE_REQUEST_BODY_TIMEOUT": "15s",
        # Above 2^31, and still digits (values arrive as floats in templates).
        "SPLITSERVE_MAX_INFLIGHT_BYTES": "4294967296",
        "SPLITSERVE_MAX_DECOMPRESSED_BYTES": "268435456",
        "SPLITSERVE_IDLE_CONNECTION_TIMEOUT": "10m",
        "SPLITSERVE_MAX_LEARNING_RATE": "0.5",
        "SPLITSERVE_MAX_ACCUMULATION_STEPS": "64",
    }


def test_only_the_limits_that_are_set_reach_the_server(chart) -> None:
    values = {"config": {"limits": {"maxConnections": 100, "idleConnectionTimeout": "0", "maxLearningRate": 1}}}
    objs = [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]
    env = {k: v.get("value") for k, v in env_of(server_container(one(objs, "Deployment"))).items()}
    got = {name: env[name] for name in LIMIT_ENV.values() if name in env}
    assert got == {
        "SPLITSERVE_MAX_CONNECTIONS": "100",
        "SPLITSERVE_IDLE_CONNECTION_TIMEOUT": "0",
        "SPLITSERVE_MAX_LEARNING_RATE": "1",
    }


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


def _mount_dir(c: dict[str, Any], name: str) -> str:
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == name]
    # A whole-volume mount: with subPath the kubelet would never swap in a renewed Secret.
    assert "subPath" not in mount and "subPathExpr" not in mount, mount
    assert mount["readOnly"] is True, mount
    return mount["mountPath"]


@pytest.mark.parametrize("key", ["all", "all-pvc"])
def test_tls_client_ca_and_tokens_are_mounted_secrets(key: str) -> None:
    dep = one(objects(key), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    env = {k: v.get("value") for k, v in env_of(c).items()}

    assert _volume(pod, "tls-server")["secret"]["secretName"] == "splitserve-tls"
    tls_dir = _mount_dir(c, "tls-server")
    assert env["SPLITSERVE_TLS_CERT"] == f"{tls_dir}/tls.crt"
    assert env["SPLITSERVE_TLS_KEY"] == f"{tls_dir}/tls.key"

    assert _volume(pod, "tls-client-ca")["secret"]["secretName"] == "splitserve-client-ca"
    assert env["SPLITSERVE_TLS_CLIENT_CA"] == f"{_mount_dir(c, 'tls-client-ca')}/ca.pem"

    assert _volume(pod, "auth-tokens")["secret"]["secretName"] == "splitserve-tokens"
    assert env["SPLITSERVE_AUTH_TOKEN_FILE"] == f"{_mount_dir(c, 'auth-tokens')}/tokens.txt"

    for name in ("tls-server", "tls-client-ca", "auth-tokens"):
        # Readable by the server (group fsGroup), by no one else.
        assert _volume(pod, name)["secret"]["defaultMode"] == 0o440, name
    assert pod["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]
    # The three directories are distinct and none hides another mount.
    paths = [m["mountPath"] for m in c["volumeMounts"]]
    assert len(paths) == len(set(paths))


def test_tls_without_client_ca_and_tokens(chart) -> None:
    values = {"tls": {"enabled": True, "secretName": "cert"}, "podSecurityContext": {"fsGroup": None}}
    objs = [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]
    dep = one(objs, "Deployment")
    c = server_container(dep)
    env = env_of(c)
    assert {"SPLITSERVE_TLS_CERT", "SPLITSERVE_TLS_KEY"} <= env.keys()
    assert "SPLITSERVE_TLS_CLIENT_CA" not in env and "SPLITSERVE_AUTH_TOKEN_FILE" not in env
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert set(vols) == {"tmp", "tls-server"}
    # No fsGroup: the files must be readable by the server's uid without it.
    assert "fsGroup" not in dep["spec"]["template"]["spec"]["securityContext"]
    assert vols["tls-server"]["secret"]["defaultMode"] == 0o444
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


def test_tokens_without_tls_keep_the_grpc_probes(chart) -> None:
    values = {"auth": {"tokenSecretName": "tokens"}}
    objs = [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]
    c = server_container(one(objs, "Deployment"))
    assert env_of(c)["SPLITSERVE_AUTH_TOKEN_FILE"]["value"] == f"{_mount_dir(c, 'auth-tokens')}/tokens"
    # grpc.health.v1 needs no token: the native gRPC probes and `splitserve probe` still work.
    assert c["readinessProbe"]["grpc"]["service"] == "splitlearn.comm.ComputeService"
    assert one(objs, "Pod", hook=True)["spec"]["containers"][0]["args"][0] == "probe"


@pytest.mark.parametrize("key", ALL_SETS)
def test_pods_run_locked_down(key: str) -> None:
    objs = objects(key)
    dep = one(objs, "Deployment")
    test_pod = one(objs, "Pod", hook=True)
    for where, pod in (("deployment", dep["spec"]["template"]["spec"]), ("test pod", test_pod["spec"])):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == 10001, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (where, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") == "tmp", (where, c["name"])
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp, where


def test_gpu_values_request_a_gpu() -> None:
    dep = one(objects("gpu"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # A GPU pod's host memory is gpu.memory, not resources' CPU-sized one.
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "16Gi"
    assert c["resources"]["limits"]["cpu"] == "4"
    assert c["image"].endswith(":0.1.0-cuda")
    assert env_of(c)["SPLITSERVE_DEVICE"]["value"] == "cuda"
    assert env_of(c)["CUDA_CACHE_PATH"]["value"].startswith("/tmp/")
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"


def test_gpu_memory_follows_gpu_values(chart) -> None:
    """gpu.memory sets a GPU pod's memory request and limit (default 16Gi
    over the CPU-sized 2Gi); empty keeps resources' own; CPU pods never
    see it."""
    def memory(values: dict) -> tuple[str, str]:
        res = server_container(one(render_values(chart, values), "Deployment"))["resources"]
        return res["requests"]["memory"], res["limits"]["memory"]

    assert memory({"gpu": {"enabled": True}}) == ("16Gi", "16Gi")
    assert memory({"gpu": {"enabled": True, "memory": "40Gi"}}) == ("40Gi", "40Gi")
    assert memory({"gpu": {"enabled": True, "memory": ""}}) == ("2Gi", "2Gi")
    assert memory({"gpu": {"memory": "40Gi"}}) == ("2Gi", "2Gi")


def test_default_values_request_no_gpu() -> None:
    dep = one(objects("default"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    assert not any("nvidia" in k for k in c["resources"].get("limits", {}))
    assert c["image"].endswith(":0.1.0-cpu")
    assert "nodeSelector" not in pod and "tolerations" not in pod and "runtimeClassName" not in pod


def test_init_container_model_source() -> None:
    pod = one(objects("all"), "Deployment")["spec"]["template"]["spec"]
    # values-all also copies a model repository out of an image (test_model_repository.py).
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-models", "copy-model-repository"]
    init = pod["initContainers"][0]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert {"name": "MODEL_DIR", "value": "/models"} in init["env"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["emptyDir"] == {"sizeLimit": "2Gi"}
    mount = next(m for m in server_container_pod(pod)["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}


def test_pvc_model_source() -> None:
    pod = one(objects("all-pvc"), "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod.get("initContainers", [])] == ["copy-model-repository"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "splitserve-models", "readOnly": True}
    mount = next(m for m in server_container_pod(pod)["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "v3"}


def server_container_pod(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "splitserve")


def main_service(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The release's Service (not the optional <name>-headless one)."""
    return one(objs, "Service", name="splitserve")


# ------------------------------------------------------------------ Service, monitoring, scaling


@pytest.mark.parametrize("key", ALL_SETS)
def test_service_ports_and_selector(key: str) -> None:
    objs = objects(key)
    svc = main_service(objs)
    dep = one(objs, "Deployment")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc", "http", "metrics"}
    assert ports["grpc"]["targetPort"] == "grpc"
    # Cleartext HTTP/2 is h2c; TLS that ends in the server is opaque to meshes.
    assert ports["grpc"].get("appProtocol") == (None if _tls_on(key) else "kubernetes.io/h2c")
    # The Open Inference Protocol's REST port, over TLS with the same certificate when tls is on.
    assert ports["http"]["targetPort"] == "http"
    assert ports["http"]["appProtocol"] == ("https" if _tls_on(key) else "http")
    assert ports["http"]["port"] == VALUE_SETS[key].get("service", {}).get("httpPort", 8000)
    container_ports = {p["name"] for p in server_container(dep)["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    assert ports["metrics"]["appProtocol"] == "http" and ports["metrics"]["targetPort"] == "metrics"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector == dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    # The helm test pod must not become an endpoint of the Service.
    test_labels = one(objs, "Pod", hook=True)["metadata"]["labels"]
    assert not selector.items() <= test_labels.items()


@pytest.mark.parametrize("key", ALL_SETS)
def test_helm_test_pod_probes_the_service(key: str) -> None:
    objs = objects(key)
    pod = one(objs, "Pod", hook=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    svc = main_service(objs)
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    if _tls_on(key):
        # `splitserve probe` speaks plaintext gRPC; the admin port stays HTTP.
        assert c["command"] == [
            "wget", "-q", "-O", "-", "-T", "5",
            f"http://{svc['metadata']['name']}:{ports['metrics']}/readyz",
        ]
        assert c["image"] == "registry.example.com/mirror/busybox:1.37"
    else:
        assert c["command"] == ["splitserve-client"]
        assert c["args"] == [
            "probe",
            "--addr",
            f"{svc['metadata']['name']}:{ports['grpc']}",
            "--service",
            "splitlearn.comm.ComputeService",
        ]
        assert c["image"] == server_container(one(objs, "Deployment"))["image"]
    assert pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("key", ALL_SETS)
def test_dashboard_configmap_is_found_by_grafana(key: str) -> None:
    cm = one(objects(key), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, text), = cm["data"].items()
    assert name.endswith(".json")
    assert json.loads(text) == json.loads((DASHBOARDS / "splitserve-contention.json").read_text())


def test_dashboard_configmap_options() -> None:
    cm = one(objects("all"), "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "ml-platform"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML serving"}


def test_service_monitor_scrapes_the_metrics_port() -> None:
    objs = objects("all")
    sm = one(objs, "ServiceMonitor")
    svc = main_service(objs)
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _alerts(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_prometheus_rule_carries_the_alerts_file(chart) -> None:
    """With the default thresholds the PrometheusRule is dashboards/alerts.yaml."""
    objs = [o for _, o in render_deploy.manifests(
        chart.render({"prometheusRule": {"enabled": True}}, name="splitserve", namespace="ml"))]
    rule = one(objs, "PrometheusRule")
    want = yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text(encoding="utf-8"))
    assert rule["spec"] == want
    assert [g["name"] for g in rule["spec"]["groups"]]


def test_prometheus_rule_follows_the_values() -> None:
    """values-all.yaml: its own runbook URL, p99 objective and scrape job."""
    rule = one(objects("all"), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = _alerts(rule)
    base = VALUE_SETS["all"]["prometheusRule"]["runbookUrl"]
    for name, r in alerts.items():
        assert r["annotations"]["runbook_url"] == f"{base}#{name.lower()}", name
        assert "runbook" not in r["annotations"], name
    p99 = alerts["SplitserveLatencyP99AboveObjective"]
    assert re.search(r"\) > 1\.5\s*$", p99["expr"]), p99["expr"]
    assert "{{ 1.5 | humanizeDuration }}" in p99["annotations"]["summary"]
    assert 'up{job="splitserve-metrics"} == 0' in alerts["SplitserveTargetDown"]["expr"]
    # The Deployment the readiness alert watches is the chart's own.
    deployment = one(objects("all"), "Deployment")["metadata"]["name"]
    assert f'deployment="{deployment}"' in alerts["SplitservePodsNotReady"]["expr"]


def test_hpa_scales_on_cpu_and_queue_depth() -> None:
    objs = objects("all")
    hpa = one(objs, "HorizontalPodAutoscaler")
    dep = one(objs, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "splitserve_queue_depth"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}


def _ingress_rules(np: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Port name -> the ingress rule that admits it (each port in exactly one rule)."""
    rules = {}
    for rule in np["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] not in rules, f"port {port['port']} in two rules"
            assert port["protocol"] == "TCP"
            rules[port["port"]] = rule
    return rules


def _admits_test_pod_only(peer: dict[str, Any], test_pod: dict[str, Any], server_labels: dict[str, str]) -> bool:
    """A peer that matches the helm test pod of this namespace and not the server pods."""
    if set(peer) != {"podSelector"} or set(peer["podSelector"]) != {"matchLabels"}:
        return False
    labels = peer["podSelector"]["matchLabels"]
    return labels.items() <= test_pod["metadata"]["labels"].items() and not labels.items() <= server_labels.items()


def test_network_policy_admits_clients_scrapers_and_the_test_pod() -> None:
    objs = objects("all")
    np = one(objs, "NetworkPolicy")
    dep = one(objs, "Deployment")
    test_pod = one(objs, "Pod", hook=True)
    server_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    rules = _ingress_rules(np)
    assert set(rules) == {"grpc", "http", "metrics"}
    for port in ("grpc", "http", "metrics"):
        assert any(_admits_test_pod_only(p, test_pod, server_labels) for p in rules[port]["from"]), port
    # The HTTP/REST port serves the same inference: the same peers as gRPC.
    assert rules["http"]["from"] == rules["grpc"]["from"]
    # Exactly the listed peers, plus the test pod.
    assert rules["grpc"]["from"][:-1] == VALUE_SETS["all"]["networkPolicy"]["grpcFrom"]
    assert rules["metrics"]["from"][:-1] == VALUE_SETS["all"]["networkPolicy"]["metricsFrom"]
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_network_policy_is_on_by_default_for_the_release_namespace() -> None:
    np = one(objects("default"), "NetworkPolicy")
    assert set(_ingress_rules(np)) == {"grpc", "http", "metrics"}
    for port, rule in _ingress_rules(np).items():
        # An empty podSelector without a namespaceSelector: the release's own namespace.
        assert rule["from"][0] == {"podSelector": {}}, port
        assert len(rule["from"]) == 2, port
    assert np["spec"]["policyTypes"] == ["Ingress"]


def test_network_policy_with_no_sources_admits_only_the_test_pod(chart) -> None:
    values = {"networkPolicy": {"enabled": True, "grpcFrom": [], "metricsFrom": []}}
    objs = [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]
    np = one(objs, "NetworkPolicy")
    test_pod = one(objs, "Pod", hook=True)
    server_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    kubernetes_validate.validate(np, KUBE_VERSIONS[-1], strict=True)
    rules = _ingress_rules(np)
    assert set(rules) == {"grpc", "http", "metrics"}
    for port, rule in rules.items():
        # Never a rule without `from` (which would admit every source).
        (peer,) = rule["from"]
        assert _admits_test_pod_only(peer, test_pod, server_labels), (port, peer)
    # Not one ingress rule for any other port either.
    assert len(np["spec"]["ingress"]) == 2
    notes = chart.render(values, name="splitserve", namespace="ml")["splitserve/templates/NOTES.txt"]
    assert "no client can reach the gRPC port" in notes


def test_network_policy_can_be_switched_off(chart) -> None:
    values = {"networkPolicy": {"enabled": False}}
    objs = [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]
    assert not [o for o in objs if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("key", ALL_SETS)
def test_notes_show_how_to_reach_both_ports(key: str) -> None:
    notes = rendered(key)["splitserve/templates/NOTES.txt"]
    ports = {p["name"]: p["port"] for p in main_service(objects(key))["spec"]["ports"]}
    assert f"{ports['grpc']}:grpc {ports['http']}:http" in notes  # the port-forward line
    # Reflection lists every service on the gRPC port; the v2 health endpoint on the HTTP port.
    (listing,) = [line for line in notes.splitlines() if line.strip().startswith("grpcurl") and " list" in line]
    assert f"localhost:{ports['grpc']} list" in listing
    (ready,) = [line for line in notes.splitlines() if "/v2/health/ready" in line]
    assert ready.strip().startswith("curl ")
    if _tls_on(key):
        assert "-plaintext" not in notes
        assert "-cacert ca.crt" in listing and "--cacert ca.crt" in ready
        assert f"https://splitserve.ml.svc:{ports['http']}/v2/health/ready" in ready
    else:
        assert listing.strip().startswith("grpcurl -plaintext")
        assert f"localhost:{ports['http']}/v2/health/ready" in ready
        assert f'tritonclient.http as h; print(h.InferenceServerClient("localhost:{ports["http"]}")' in notes
    # Health needs no token; everything else does when tokens are on.
    assert "authorization" not in ready
    if VALUE_SETS[key].get("auth", {}).get("tokenSecretName"):
        assert 'authorization: Bearer $TOKEN' in listing
        # grpcurl asks reflection (scope infer) before it calls even the health check.
        (health,) = [line for line in notes.splitlines() if "grpc.health.v1.Health/Check" in line]
        assert 'authorization: Bearer $TOKEN' in health


def test_notes_say_what_keeps_prometheus_from_scraping(chart) -> None:
    """The defaults a Prometheus elsewhere trips on are named with their fix."""
    values = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    notes = chart.render(values, name="splitserve", namespace="ml")["splitserve/templates/NOTES.txt"]
    assert "a Prometheus in another namespace cannot scrape them, and SplitserveTargetDown fires" in notes
    assert "serviceMonitorSelector matches serviceMonitor.labels (now {}" in notes
    assert "scrapes them every" not in notes  # a promise nobody can keep without a matching Prometheus
    assert "prometheusRule.runbookUrl to where docs/runbooks.md is served" in notes
    values = {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "prometheusRule": {"enabled": True, "runbookUrl": "https://git.example.com/splitserve/docs/runbooks.md"},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    }
    notes = chart.render(values, name="splitserve", namespace="ml")["splitserve/templates/NOTES.txt"]
    assert "another namespace" not in notes and "runbookUrl to where" not in notes
    assert '(now {"release":"kps"})' in notes


def test_pdb_selects_the_server_pods() -> None:
    for key in ("default", "all"):
        objs = objects(key)
        pdb = one(objs, "PodDisruptionBudget")
        dep = one(objs, "Deployment")
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert one(objects("default"), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one(objects("all"), "PodDisruptionBudget")["spec"]["minAvailable"] == 2


# ------------------------------------------------------------------ scaling out: connection age, headless Service


def _render_objects(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for _, o in render_deploy.manifests(chart.render(values, name="splitserve", namespace="ml"))]


def _server_env(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: v.get("value") for k, v in env_of(server_container(one(objs, "Deployment"))).items()}


@pytest.mark.parametrize(
    "config, want",
    [
        # Numbers are seconds; "0" switches the GOAWAY off, and its grace with it.
        ({"maxConnectionAge": "90s", "maxConnectionAgeGrace": "5s"}, {"SPLITSERVE_MAX_CONNECTION_AGE": "90s", "SPLITSERVE_MAX_CONNECTION_AGE_GRACE": "5s"}),
        ({"maxConnectionAge": 600}, {"SPLITSERVE_MAX_CONNECTION_AGE": "600", "SPLITSERVE_MAX_CONNECTION_AGE_GRACE": "30s"}),
        ({"maxConnectionAge": "0"}, {"SPLITSERVE_MAX_CONNECTION_AGE": "0"}),
        ({"maxConnectionAge": 0}, {"SPLITSERVE_MAX_CONNECTION_AGE": "0"}),
    ],
)
def test_max_connection_age_reaches_the_server(chart, config: dict[str, Any], want: dict[str, str]) -> None:
    env = _server_env(_render_objects(chart, {"config": config}))
    got = {k: v for k, v in env.items() if k.startswith("SPLITSERVE_MAX_CONNECTION_AGE")}
    assert got == want


def test_notes_explain_how_clients_rebalance() -> None:
    default = rendered("default")["splitserve/templates/NOTES.txt"]
    # Unchanged splitlearn_comm clients cannot configure round robin: the GOAWAY moves them.
    assert "Connections older than 5m get a GOAWAY" in default
    assert "unchanged splitlearn_comm ones included" in default
    assert "round robin" not in default and "clusterIP=None" not in default
    assert "-headless" not in default
    notes = rendered("all")["splitserve/templates/NOTES.txt"]
    assert "Connections older than 10m get a GOAWAY (in-flight calls finish within 1m)" in notes
    assert "dns:///splitserve-headless.ml.svc:50051" in notes and "round_robin" in notes


def test_headless_service_is_off_by_default() -> None:
    assert [s["metadata"]["name"] for s in objects("default") if s["kind"] == "Service"] == ["splitserve"]


def test_headless_service_for_clients_that_balance_themselves() -> None:
    objs = objects("all")
    svc = main_service(objs)
    headless = one(objs, "Service", name="splitserve-headless")
    dep = one(objs, "Deployment")
    # The ClusterIP Service stays, for the clients that cannot balance per call.
    assert svc["spec"].get("clusterIP") != "None"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert headless["metadata"]["annotations"] == {"example.com/dns": "client-balanced"}
    # Clients dial the pods' addresses: the ports are the container ports, whatever service.*Port says.
    container_ports = {p["name"]: p["containerPort"] for p in server_container(dep)["ports"]}
    ports = {p["name"]: p for p in headless["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}, "no metrics port: a ServiceMonitor must not scrape every pod twice"
    for name, port in ports.items():
        assert port["port"] == container_ports[name] and port["targetPort"] == name, name
    assert ports["http"]["appProtocol"] == "https"  # values-all has TLS on
    # The ServiceMonitor finds exactly one Service with a metrics port.
    sm = one(objs, "ServiceMonitor")
    selector = sm["spec"]["selector"]["matchLabels"].items()
    scraped = [
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "Service"
        and selector <= o["metadata"]["labels"].items()
        and any(p["name"] == "metrics" for p in o["spec"]["ports"])
    ]
    assert scraped == ["splitserve"]


def test_headless_service_without_tls_speaks_h2c(chart) -> None:
    objs = _render_objects(chart, {"service": {"headless": {"enabled": True}, "grpcPort": 443}})
    headless = one(objs, "Service", name="splitserve-headless")
    ports = {p["name"]: p for p in headless["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["grpc"]["port"] == 50051  # the container port, not service.grpcPort
    for obj in objs:
        if obj["kind"] == "Service":
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------ training


def test_training_runs_one_pod_with_a_writable_checkpoint_volume() -> None:
    objs = objects("training")
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    # One pod, replaced (never rolled) so two pods never share the checkpoints.
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    kinds = {o["kind"] for o in objs}
    assert "HorizontalPodAutoscaler" not in kinds
    # No budget: on one pod it would block drains forever (minAvailable 1) or protect nothing.
    assert "PodDisruptionBudget" not in kinds
    # The claim the chart creates, mounted writable where SPLITSERVE_CHECKPOINT_DIR points.
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "splitserve-checkpoints"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Trained weights outlive helm uninstall.
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep", "example.com/backup": "daily"}
    assert _volume(pod, "checkpoints")["persistentVolumeClaim"] == {"claimName": "splitserve-checkpoints"}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "checkpoints"]
    assert mount.get("readOnly") is not True
    assert mount["mountPath"] == "/var/lib/splitserve/checkpoints"
    # The server's group owns the volume (fsGroup), so uid 10001 can write it.
    assert pod["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]
    # The models still come read-only from their own claim.
    models = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True


def test_training_env_configures_the_optimizer_and_checkpoints() -> None:
    c = server_container(one(objects("training"), "Deployment"))
    env = {k: v.get("value") for k, v in env_of(c).items()}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "checkpoints")
    assert {k: env.get(k) for k in TRAINING_ENV} == {
        "SPLITSERVE_TRAINABLE": "top,head",
        # Maps are NAME=VALUE lists (by name); single values apply to every model.
        "SPLITSERVE_OPTIMIZER": "head=sgd,top=adam",
        "SPLITSERVE_LEARNING_RATE": "0.01",
        "SPLITSERVE_MOMENTUM": "head=0.9",
        "SPLITSERVE_WEIGHT_DECAY": "0.0001",
        "SPLITSERVE_ADAM_BETAS": "top=0.9:0.98",
        "SPLITSERVE_ADAM_EPS": "1e-08",
        "SPLITSERVE_CHECKPOINT_DIR": mount["mountPath"],
        "SPLITSERVE_CHECKPOINT_EVERY": "50",
        "SPLITSERVE_CHECKPOINT_KEEP": "5",
        "SPLITSERVE_ACTIVATION_CACHE_BYTES": "2147483648",
        "SPLITSERVE_ACTIVATION_TTL": "2m",
    }
    # One pod: no GOAWAY, which would only interrupt the clients between forward and backward.
    assert not [k for k in env if k.startswith("SPLITSERVE_MAX_CONNECTION_AGE")]


def test_training_defaults(chart) -> None:
    objs = _render_objects(chart, {"training": {"enabled": True, "models": ["mlp"]}})
    env = _server_env(objs)
    assert {k: env[k] for k in TRAINING_ENV if k in env} == {
        "SPLITSERVE_TRAINABLE": "mlp",
        "SPLITSERVE_CHECKPOINT_DIR": "/var/lib/splitserve/checkpoints",
        "SPLITSERVE_CHECKPOINT_EVERY": "100",
        "SPLITSERVE_CHECKPOINT_KEEP": "3",
    }
    assert "SPLITSERVE_MAX_CONNECTION_AGE" not in env
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    # The default PDB switch is on, and still no budget for the training pod.
    assert not [o for o in objs if o["kind"] in ("PodDisruptionBudget", "HorizontalPodAutoscaler")]
    pvc = one(objs, "PersistentVolumeClaim")
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    for obj in objs:
        if obj["kind"] != "Pod":
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    notes = chart.render({"training": {"enabled": True, "models": ["mlp"]}}, name="splitserve", namespace="ml")[
        "splitserve/templates/NOTES.txt"
    ]
    assert "Trainable models (ComputeBackward with a learning rate): mlp." in notes
    assert "PersistentVolumeClaim splitserve-checkpoints" in notes and "GOAWAY" not in notes


def test_training_with_an_existing_claim_and_explicit_settings(chart) -> None:
    values = {
        "replicaCount": 1,
        "config": {"maxConnectionAge": "30m"},
        "training": {
            "enabled": True,
            "models": ["mlp"],
            "checkpointEvery": 0,
            "checkpoints": {"existingClaim": "trained-weights", "subPath": "run-7", "mountPath": "/ckpt"},
        },
    }
    objs = _render_objects(chart, values)
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1
    assert _volume(pod, "checkpoints")["persistentVolumeClaim"] == {"claimName": "trained-weights"}
    (mount,) = [m for m in server_container(dep)["volumeMounts"] if m["name"] == "checkpoints"]
    assert mount["mountPath"] == "/ckpt" and mount["subPath"] == "run-7"
    env = _server_env(objs)
    assert env["SPLITSERVE_CHECKPOINT_DIR"] == "/ckpt"
    assert env["SPLITSERVE_CHECKPOINT_EVERY"] == "0"
    # An explicit age applies even to the training pod.
    assert env["SPLITSERVE_MAX_CONNECTION_AGE"] == "30m"


def test_inference_keeps_replicas_hpa_and_pdb() -> None:
    dep = one(objects("default"), "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not [o for o in objects("default") if o["kind"] == "PersistentVolumeClaim"]
    kinds = {o["kind"] for o in objects("all")}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert "PersistentVolumeClaim" not in kinds


def test_kserve_runtime_never_trains(chart) -> None:
    values = {"training": {"enabled": True, "models": ["mlp"]}, "kserve": {"servingRuntime": {"enabled": True}}}
    runtime = one(_render_objects(chart, values), "ServingRuntime")
    env = {e["name"]: e.get("value") for e in runtime["spec"]["containers"][0]["env"]}
    assert not TRAINING_ENV & env.keys()
    # Its predictors serve inference behind a Service: the inference default age.
    assert env["SPLITSERVE_MAX_CONNECTION_AGE"] == "5m"
    assert "volumes" in runtime["spec"] and [v["name"] for v in runtime["spec"]["volumes"]] == ["tmp"]


# ------------------------------------------------------------------ values schema


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicaCont": 2}, "replicaCont"),
        ({"config": {"workrs": 2}}, "workrs"),
        ({"gpu": {"enable": True}}, "enable"),
        ({"probes": {"liveness": {"periodSecond": 5}}}, "periodSecond"),
        ({"config": {"device": "tpu"}}, "/config/device"),
        ({"config": {"shutdownGrace": "30 seconds"}}, "/config/shutdownGrace"),
        ({"config": {"models": [{"name": "a", "spec": "x.pt,y.pt"}]}}, "/config/models/0/spec"),
        ({"modelSource": {"type": "pvc"}}, "claimName"),
        ({"modelSource": {"type": "s3"}}, "/modelSource/type"),
        ({"tls": {"enable": True}}, "enable"),
        ({"tls": {"enabled": True}}, "secretName"),
        ({"tls": {"enabled": True, "secretName": "cert", "clientCa": {"secretName": "ca"}}}, "clientCa"),
        ({"tls": {"clientCA": {"secretName": "ca"}}}, "/tls/enabled"),
        ({"tls": {"clientCA": {"secretname": "ca"}}}, "secretname"),
        ({"auth": {"tokenSecret": "tokens"}}, "tokenSecret"),
        ({"auth": {"tokenSecretName": "Not_A_Name"}}, "/auth/tokenSecretName"),
        # config.trainable became training.models (with training.enabled).
        ({"config": {"trainable": ["mlp"]}}, "trainable"),
        ({"training": {"enabled": True, "models": "mlp"}}, "/training/models"),
        ({"training": {"enabled": True, "models": ["a,b"]}}, "/training/models/0"),
        ({"training": {"enabled": True}}, "/training/models"),
        ({"training": {"models": ["mlp"]}}, "/training/models"),
        ({"training": {"enable": True}}, "enable"),
        ({"training": {"enabled": True, "models": ["mlp"], "optimizer": "adamw"}}, "/training/optimizer"),
        ({"training": {"enabled": True, "models": ["mlp"], "optimizer": {"mlp": "rmsprop"}}}, "/training/optimizer"),
        ({"training": {"enabled": True, "models": ["mlp"], "learningRate": 0}}, "/training/learningRate"),
        ({"training": {"enabled": True, "models": ["mlp"], "adamBetas": "0.9,0.999"}}, "/training/adamBetas"),
        ({"training": {"enabled": True, "models": ["mlp"], "checkpointKeep": 0}}, "/training/checkpointKeep"),
        ({"training": {"checkpoints": {"claimName": "x"}}}, "claimName"),
        ({"training": {"checkpoints": {"accessModes": ["ReadOnlyMany"]}}}, "/training/checkpoints/accessModes/0"),
        # One pod when training: no autoscaler (more replicas: the templates say why).
        (
            {"training": {"enabled": True, "models": ["mlp"]}, "hpa": {"enabled": True}},
            "/hpa/enabled",
        ),
        ({"config": {"maxConnectionAge": "5 minutes"}}, "/config/maxConnectionAge"),
        ({"config": {"maxConnectionAgeGrace": "30 seconds"}}, "/config/maxConnectionAgeGrace"),
        ({"service": {"headless": {"enable": True}}}, "enable"),
        ({"config": {"limits": {"maxConnection": 10}}}, "maxConnection"),
        ({"config": {"limits": {"maxConnections": 0}}}, "/config/limits/maxConnections"),
        ({"config": {"limits": {"requestBodyTimeout": "30 seconds"}}}, "/config/limits/requestBodyTimeout"),
        ({"config": {"limits": {"maxLearningRate": 0}}}, "/config/limits/maxLearningRate"),
        ({"tests": {"httpImage": {"repo": "busybox"}}}, "repo"),
        ({"ports": {"http": 0}}, "/ports/http"),
        ({"service": {"httpport": 8000}}, "httpport"),
        ({"kserve": {"servingRuntime": {"enable": True}}}, "enable"),
        ({"kserve": {"servingRuntime": {"modelFile": "/mnt/models/model.pt"}}}, "/kserve/servingRuntime/modelFile"),
        ({"kserve": {"servingRuntime": {"grpcPort": "8081"}}}, "/kserve/servingRuntime/grpcPort"),
        ({"kserve": {"servingRuntime": {"name": "Splitserve_Runtime"}}}, "/kserve/servingRuntime/name"),
        ({"kserve": {"servingRuntime": {"warmupShape": "1x4,1x4"}}}, "/kserve/servingRuntime/warmupShape"),
        ({"kserve": {"runtime": {"enabled": True}}}, "runtime"),
        ({"prometheusRule": {"thresholds": {"p99LatencySecond": 1}}}, "p99LatencySecond"),
        ({"prometheusRule": {"thresholds": {"p99LatencySeconds": "250ms"}}}, "/prometheusRule/thresholds/p99LatencySeconds"),
        ({"prometheusRule": {"thresholds": {"p99LatencySeconds": 0}}}, "/prometheusRule/thresholds/p99LatencySeconds"),
        ({"prometheusRule": {"thresholds": {"queueSaturationRatio": 80}}}, "/prometheusRule/thresholds/queueSaturationRatio"),
        ({"prometheusRule": {"thresholds": {"rejectionRatio": -0.1}}}, "/prometheusRule/thresholds/rejectionRatio"),
        ({"prometheusRule": {"runbookUrl": "docs/run books.md"}}, "/prometheusRule/runbookUrl"),
        ({"prometheusRule": {"runbook": "docs/runbooks.md"}}, "runbook"),
        # One GPU per pod: more would sit idle (a model version runs on one device).
        ({"gpu": {"enabled": True, "count": 2}}, "/gpu/count"),
    ],
)
def test_schema_rejects_bad_values(chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(complaint)):
        chart.validate_schema(values)
    # An install renders through the same check.
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name="splitserve", namespace="ml")
    report = helm_python.lint(str(CHART), values=values, strict=True)
    assert report["errors"], report


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"hpa": {"enabled": True, "cpu": {"enabled": False}}}, "hpa.cpu.enabled or hpa.queueDepth.enabled"),
        ({"pdb": {"minAvailable": 1}}, "exactly one of maxUnavailable and minAvailable"),
        ({"training": {"enabled": True, "models": ["mlp", "top"]}}, 'training.models names model "top"'),
        # The schema would only say "maximum: got 2, want 1"; the template says why.
        (
            {"training": {"enabled": True, "models": ["mlp"]}, "replicaCount": 2},
            "training.enabled runs exactly one pod (a backward must reach the pod that holds its forward",
        ),
        (
            {"training": {"enabled": True, "models": ["mlp"], "learningRate": {"top": 0.1}}},
            'training.learningRate names model "top", which training.models does not list',
        ),
        (
            {"training": {"enabled": True, "models": ["mlp"], "learningRate": 0.5},
             "config": {"limits": {"maxLearningRate": 0.1}}},
            "training.learningRate 0.5 is above config.limits.maxLearningRate",
        ),
        (
            {"training": {"enabled": True, "models": ["mlp"], "checkpoints": {"mountPath": "/tmp"}}},
            "training.checkpoints.mountPath /tmp is taken",
        ),
        ({"ports": {"http": 50051}}, "ports.grpc, ports.http and ports.metrics must differ"),
        (
            {"kserve": {"servingRuntime": {"enabled": True, "grpcPort": 8080}}},
            "kserve.servingRuntime.httpPort, kserve.servingRuntime.grpcPort and ports.metrics must differ",
        ),
    ],
)
def test_templates_refuse_contradictory_values(chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        chart.render(values, name="splitserve", namespace="ml")


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
        ({"tls": {"clientCA": {"secretName": "ca"}}}, "tls.clientCA.secretName (mTLS) needs tls.enabled"),
        (
            {"training": {"enabled": True, "models": ["mlp"]}, "replicaCount": 2},
            "training.enabled runs exactly one pod",
        ),
        (
            {"training": {"enabled": True, "models": ["mlp"]}, "hpa": {"enabled": True}},
            "training.enabled runs exactly one pod, which an HPA would scale out",
        ),
        ({"training": {"enabled": True}}, "training.enabled needs training.models"),
        ({"training": {"models": ["mlp"]}}, "training.models is set but training.enabled is false"),
    ],
)
def test_templates_refuse_contradictions_even_unchecked(
    tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    """The same mistakes fail the render when the schema is not there to catch them."""
    schemaless = tmp_path / "splitserve"
    shutil.copytree(CHART, schemaless)
    (schemaless / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        render_deploy.render_chart(values, chart=schemaless)


#: Objects that stand for a Kubernetes / prometheus-operator type passed through
#: unchanged (the API server checks them); every other object in the schema is closed.
PASSTHROUGH = {
    "/properties/global",
    "/definitions/passthrough",
    "/definitions/volume",
    "/definitions/envVar/properties/valueFrom",
}


def _object_nodes(node: Any, path: str = ""):
    if isinstance(node, dict):
        types = node.get("type")
        if types == "object" or (isinstance(types, list) and "object" in types):
            yield path, node
        for key, child in node.items():
            yield from _object_nodes(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _object_nodes(child, f"{path}/{i}")


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    nodes = list(_object_nodes(schema))
    assert len(nodes) > 40
    for path, node in nodes:
        assert "additionalProperties" in node, f"{path or '/'}: object without additionalProperties"
        ap = node["additionalProperties"]
        if ap is True:
            assert path in PASSTHROUGH, f"{path}: open object not in the passthrough list"
        elif ap is not False:
            assert isinstance(ap, dict), path  # a map: its values have a schema


def test_schema_accepts_the_defaults_and_test_values(chart) -> None:
    for key in ALL_SETS:
        chart.validate_schema(VALUE_SETS[key])


def _leaf_paths(node: Any, prefix: str = ""):
    if isinstance(node, dict) and node:
        for key, child in node.items():
            yield from _leaf_paths(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
    missing = []
    for path in _leaf_paths(values):
        # A row for a path, or for one of its parents (resources covers resources.limits.cpu).
        parts = path.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            missing.append(path)
    assert not missing, f"helm/splitserve/README.md has no row for: {missing}"


# ------------------------------------------------------------------ deploy/ and file copies


def test_chart_copies_of_dashboard_files_are_identical() -> None:
    # dashboards/alerts.yaml is rendered from the chart instead (render_deploy --check).
    assert not (CHART / "files" / "alerts.yaml").exists(), "the rules live in templates/_alerts.tpl"
    for name in ("splitserve-contention.json",):
        chart_copy = CHART / "files" / name
        assert chart_copy.read_bytes() == (DASHBOARDS / name).read_bytes(), (
            f"helm/splitserve/files/{name} differs from dashboards/{name}: "
            f"cp dashboards/{name} helm/splitserve/files/{name}"
        )


def test_deploy_is_in_sync_with_the_chart() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_deploy.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_check_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", stale)
    dep = stale / "base" / "deployment.yaml"
    dep.write_text(dep.read_text().replace("value: json", "value: text"))
    (stale / "base" / "extra.yaml").write_text("kind: ConfigMap\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_deploy.py"), "--check", "--out", str(stale)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert re.search(r"^-\s+value: text$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\+\s+value: json$", proc.stdout, re.M), proc.stdout
    assert "base/extra.yaml" in proc.stderr


def _kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _normalised(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for c in obj["spec"]["template"]["spec"]["containers"]:
        c["env"] = sorted(c.get("env", []), key=lambda e: e["name"])
    return obj


def test_kustomize_renders_base_and_overlays() -> None:
    default = [o for _, o in render_deploy.plain_objects()]
    gpu = [o for _, o in render_deploy.plain_objects(render_deploy.GPU_VALUES)]
    for overlay, want in (("base", default), ("overlays/cpu", default), ("overlays/gpu", gpu)):
        got = _kustomize(ROOT / "deploy" / overlay)
        for obj in got:
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
        assert sorted((o["kind"], o["metadata"]["name"]) for o in got) == sorted(
            (o["kind"], o["metadata"]["name"]) for o in want
        ), overlay
        # The overlay's Deployment is exactly what the chart renders for those values.
        assert _normalised(one(got, "Deployment")) == _normalised(one(want, "Deployment")), overlay
    gpu_dep = one(_kustomize(ROOT / "deploy" / "overlays" / "gpu"), "Deployment")
    assert server_container(gpu_dep)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_llm_docs_session_values_reach_the_server(chart) -> None:
    """docs/llm.md's chart values for a model with KV sessions render, and its
    settings reach the server's environment; no headless Service (per-call
    balancing would spread one generation's steps over pods)."""
    text = (ROOT / "docs" / "llm.md").read_text(encoding="utf-8")
    section = text.split("Chart settings for models with sessions", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    objs = render_values(chart, yaml.safe_load(block))
    env = {k: v.get("value") for k, v in env_of(server_container(one(objs, "Deployment"))).items()}
    assert env["SPLITSERVE_KV_SESSIONS"] == "gpt2"
    assert env["SPLITSERVE_MODEL"].startswith("gpt2=")
    assert env["SPLITSERVE_MAX_CONNECTION_AGE"] == "1h"
    assert {"SPLITSERVE_KV_CACHE_BYTES", "SPLITSERVE_KV_SESSION_TTL"} <= set(env)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Service"] == ["splitserve"]


# ------------------------------------------------------------------ chart <-> binary

#: The server binary the chart's image runs (`make build`; `make test` builds it first).
BINARY = ROOT / "target" / "release" / "splitserve"


def _binary_env_names() -> set[str]:
    """The SPLITSERVE_* variables `splitserve serve` reads, as its --help lists them."""
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} is missing: run `make build` (make test-deploy does)")
    out = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True)
    # clap wraps "[env: NAME=]" across lines: join them back first.
    names = set(re.findall(r"\[env:\s+(SPLITSERVE_[A-Z0-9_]+)=", re.sub(r"\s+", " ", out.stdout)))
    assert len(names) > 50, f"cannot read the env names from --help:\n{out.stdout[:2000]}"
    return names


def _env_lists(node: Any):
    """Every `env` list of a container anywhere in a rendered object."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from _env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_lists(item)


def test_every_variable_the_chart_sets_is_one_the_binary_reads() -> None:
    known = _binary_env_names()
    rendered_names: dict[str, set[str]] = {}
    for key in ALL_SETS:
        for obj in objects(key):
            for env in _env_lists(obj):
                for entry in env:
                    if entry.get("name", "").startswith("SPLITSERVE_"):
                        rendered_names.setdefault(entry["name"], set()).add(key)
    assert len(rendered_names) > 20, sorted(rendered_names)
    unknown = {name: sorted(sets) for name, sets in rendered_names.items() if name not in known}
    assert not unknown, f"the chart sets variables `splitserve serve` does not read (silently ignored): {unknown}"


def test_every_limit_value_names_a_variable_the_binary_reads(chart) -> None:
    known = _binary_env_names()
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    base = env_of(server_container(one(render_values(chart, {}), "Deployment")))
    for key in values["config"]["limits"]:
        # Each limit alone, rendered from the chart (not from LIMIT_ENV): the variable it sets.
        sample = "30s" if "Timeout" in key else 7
        objs = render_values(chart, {"config": {"limits": {key: sample}}})
        env = env_of(server_container(one(objs, "Deployment")))
        added = sorted(set(env) - set(base))
        assert added == [LIMIT_ENV[key]], f"config.limits.{key} renders {added}, not {LIMIT_ENV[key]}"
        assert added[0] in known, f"config.limits.{key} sets {added[0]}, which `splitserve serve` does not read"
    # And every limit the chart table knows is a value of the chart.
    assert set(LIMIT_ENV) == set(values["config"]["limits"])

"""KEDA autoscaling: the chart's ScaledObject (autoscaling.keda) and the KServe
InferenceService example with KEDA's autoscaler class.

No package in the registries this project uses carries KEDA's CRD OpenAPI
schema (cloudcoil-models-keda has pydantic classes generated from it, which
need the cloudcoil runtime), so the ScaledObject is checked against the fields
KEDA documents (keda.sh, "ScaledObject specification" and the Prometheus
scaler), written down below as a closed JSON schema: a misspelt or misplaced
field fails. Its query is evaluated by promtool over series named as
splitserve exports them."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

from deploy_support import CHART, ROOT, objects, one, promtool, render_deploy

#: KEDA's documented ScaledObject fields (v2.x), closed at every level, with
#: the Prometheus trigger's metadata (values are strings in KEDA's metadata).
STRING = {"type": "string"}
SCALED_OBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"apiVersion": STRING, "kind": STRING, "name": STRING,
                                   "envSourceContainerName": STRING},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": STRING,
                            "name": STRING,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {k: STRING for k in (
                                    "serverAddress", "query", "threshold", "activationThreshold",
                                    "namespace", "customHeaders", "ignoreNullValues", "queryParameters",
                                    "unsafeSsl", "authModes")},
                            },
                        },
                    },
                },
            },
        },
    },
}


def scaled_object(values: dict[str, Any] | None = None, key: str = "keda") -> dict[str, Any]:
    if values is None:
        return one(objects(key), "ScaledObject")
    rendered = render_deploy.render_chart(values, name="splitserve", namespace="ml")
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    (obj,) = [d for d in docs if d.get("kind") == "ScaledObject"]
    return obj


def test_scaled_object_follows_kedas_documented_fields() -> None:
    obj = scaled_object()
    jsonschema.validate(obj, SCALED_OBJECT)
    spec = obj["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "splitserve"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (3, 12)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (10, 120)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring.svc:9090"
    assert trigger["metadata"]["threshold"] == "4"
    # The check is not a no-op: a misplaced field fails it.
    wrong = copy.deepcopy(obj)
    wrong["spec"]["minReplicas"] = wrong["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, SCALED_OBJECT)


def test_keda_owns_the_replicas_and_no_hpa_is_rendered() -> None:
    objs = objects("keda")
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    dep = one(objs, "Deployment")
    assert "replicas" not in dep["spec"]
    assert one(objs, "ScaledObject")["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # Off by default.
    assert not [o for o in objects("default") if o["kind"] == "ScaledObject"]


def test_the_trigger_query_sums_the_release_pods_queue_depth(tmp_path: Path) -> None:
    """promtool evaluates the rendered query over series as Prometheus scrapes
    them from splitserve: the release's pods add up, another release's do not."""
    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'nv_inference_pending_request_count{namespace="ml",pod="splitserve-7d9f-abcde",model="m",version="1"}',
                 "values": "3 3"},
                {"series": 'nv_inference_pending_request_count{namespace="ml",pod="splitserve-7d9f-fghij",model="m",version="1"}',
                 "values": "5 5"},
                {"series": 'nv_inference_pending_request_count{namespace="other",pod="splitserve-1-x",model="m",version="1"}',
                 "values": "100 100"},
            ],
            "promql_expr_test": [{"expr": query, "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 8}]}],
        }],
    }
    (tmp_path / "rules.yaml").write_text("groups: []\n")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    custom = scaled_object({"autoscaling": {"keda": {"enabled": True, "query": "sum(splitserve_queue_depth)"}}})
    assert custom["spec"]["triggers"][0]["metadata"]["query"] == "sum(splitserve_queue_depth)"


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"autoscaling": {"keda": {"enabled": True}}, "hpa": {"enabled": True}}, "/hpa/enabled"),
        ({"autoscaling": {"keda": {"enabled": True}}, "training": {"enabled": True, "models": ["mlp"]}},
         "/training/enabled"),
        ({"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}, "/autoscaling/keda/minReplicas"),
        ({"autoscaling": {"keda": {"enabled": True, "queueDepthPerPod": 8}}}, "/autoscaling/keda/queueDepthPerPod"),
        ({"autoscaling": {"keda": {"enable": True}}}, "enable"),
    ],
)
def test_schema_refuses_keda_beside_another_autoscaler_or_training(chart, values, complaint) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(complaint)):
        chart.validate_schema(values)


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"autoscaling": {"keda": {"enabled": True}}, "hpa": {"enabled": True}},
         "autoscaling.keda.enabled makes its own HorizontalPodAutoscaler"),
        ({"autoscaling": {"keda": {"enabled": True}}, "training": {"enabled": True, "models": ["mlp"]}},
         "which KEDA would scale out"),
        ({"autoscaling": {"keda": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
         "autoscaling.keda.maxReplicas must not be below"),
    ],
)
def test_templates_refuse_keda_contradictions_even_unchecked(tmp_path: Path, values, complaint) -> None:
    schemaless = tmp_path / "splitserve"
    shutil.copytree(CHART, schemaless)
    (schemaless / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        render_deploy.render_chart(values, chart=schemaless)

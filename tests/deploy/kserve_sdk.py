"""Reads KServe objects into the KServe Python SDK's typed models, strictly.

Runs under .venv-kserve (scripts/setup-deploy-tools.sh), which has the `kserve`
package; the project's .venv cannot (kserve pins protobuf<7). test_kserve.py
calls it:

    .venv-kserve/bin/python tests/deploy/kserve_sdk.py < request.json

stdin: a JSON list of {"object": {...}, "get": ["spec.containers[0].name", ...]}.
stdout: a JSON list, one entry per object:
    {"class": "V1alpha1ServingRuntime",   # the SDK class for its apiVersion and kind
     "errors": [...],                     # unknown fields, wrong types, missing required fields
     "roundtrip": {...},                  # the typed object serialised again by kserve.ApiClient
     "get": {"spec.containers[0].name": ...}}   # attributes read off the typed object

The SDK's own ApiClient.deserialize drops fields it does not know and cannot
resolve Kubernetes types (V1Container) from inside a KServe type, so this walks
the models' openapi_types itself: KServe classes from kserve.models, Kubernetes
ones from kubernetes.client.models, and every key the class does not declare is
an error. The classes check the rest when they are built: required fields, and
(the Kubernetes ones, pydantic models) strict types.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from typing import Any

import kserve
import kserve.models
import kubernetes.client.models

#: (apiVersion, kind) -> SDK class name.
CLASSES = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def resolve(name: str) -> type:
    for module in (kserve.models, kubernetes.client.models):
        cls = getattr(module, name, None)
        if cls is not None:
            return cls
    raise LookupError(f"no SDK class {name}")


class Reader:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def read(self, data: Any, type_name: str, path: str) -> Any:
        if data is None:
            return None
        m = re.fullmatch(r"[lL]ist\[(.*)\]", type_name)
        if m:
            if not isinstance(data, list):
                self.errors.append(f"{path}: expected a list ({type_name}), got {type(data).__name__}")
                return None
            return [self.read(item, m.group(1), f"{path}[{i}]") for i, item in enumerate(data)]
        m = re.fullmatch(r"dict\(([^,]*), (.*)\)|Dict\[([^,]*), (.*)\]", type_name)
        if m:
            value_type = m.group(2) or m.group(4)
            if not isinstance(data, dict):
                self.errors.append(f"{path}: expected a map ({type_name}), got {type(data).__name__}")
                return None
            return {k: self.read(v, value_type, f"{path}.{k}") for k, v in data.items()}
        if type_name in ("object", "Any"):
            return data
        primitive = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
        if type_name in primitive:
            ok = isinstance(data, primitive[type_name]) and not (
                type_name in ("int", "float") and isinstance(data, bool)
            )
            if not ok:
                self.errors.append(f"{path}: expected {type_name}, got {type(data).__name__} {data!r}")
            return data
        # A Kubernetes quantity ("8", "500m"), which the SDK names but does not define.
        if type_name == "V1beta1MetricQuantity":
            if not isinstance(data, (str, int, float)) or isinstance(data, bool):
                self.errors.append(f"{path}: expected a quantity, got {type(data).__name__} {data!r}")
            return data
        if type_name in ("date", "datetime"):
            return data if isinstance(data, (str, datetime.date)) else None
        return self.model(data, resolve(type_name), path)

    def model(self, data: Any, cls: type, path: str) -> Any:
        if not isinstance(data, dict):
            self.errors.append(f"{path}: expected an object ({cls.__name__}), got {type(data).__name__}")
            return None
        by_key = {key: attr for attr, key in cls.attribute_map.items()}
        for key in data:
            if key not in by_key:
                self.errors.append(f"{path}.{key}: not a field of {cls.__name__}")
        kwargs = {
            attr: self.read(data[key], cls.openapi_types[attr], f"{path}.{key}")
            for key, attr in by_key.items()
            if key in data
        }
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            self.errors.append(f"{path}: {cls.__name__}: {e}")
            return None


def get(obj: Any, path: str) -> Any:
    """Attribute path on the typed object: spec.containers[0].ports[1].name."""
    value = obj
    for part in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]", path):
        if value is None:
            return None
        value = value[int(part[1:-1])] if part.startswith("[") else getattr(value, part)
    return kserve.ApiClient().sanitize_for_serialization(value)


def check(request: dict[str, Any]) -> dict[str, Any]:
    data = request["object"]
    name = CLASSES.get((data.get("apiVersion"), data.get("kind")))
    if name is None:
        return {"class": None, "errors": [f"no SDK class for {data.get('apiVersion')} {data.get('kind')}"]}
    reader = Reader()
    obj = reader.model(data, resolve(name), data["kind"])
    return {
        "class": type(obj).__name__ if obj is not None else None,
        "errors": reader.errors,
        "roundtrip": kserve.ApiClient().sanitize_for_serialization(obj),
        "get": {path: get(obj, path) for path in request.get("get", [])},
    }


def main() -> int:
    json.dump([check(r) for r in json.load(sys.stdin)], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

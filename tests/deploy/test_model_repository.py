"""The chart's model repository (modelRepository) and the example repository.

What a user would notice: each source (PersistentVolumeClaim, ConfigMap, image)
gives the server the repository read-only at modelRepository.mountPath, the
control mode, the poll interval and the models to load reach the server as the
variables its flags read, no built-in model appears beside the repository's,
the init container that copies an image's repository is as locked down as the
server and its copy script works, nonsense in the values is refused (by the
schema, and by the templates when the schema is bypassed), NOTES.txt says what
was deployed and warns where explicit mode surprises, the documented YAML is
valid, and examples/model_repository/ is a repository that Triton's format and
torch accept. The value sets of deploy_support.VALUE_SETS (repository-pvc,
repository-configmap, repository-image, all) also run through every test of
test_chart.py: lint, Kubernetes schemas, lock-down, probes.
"""

from __future__ import annotations

import importlib
import os
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
    render_values,
    CHART,
    ROOT,
    VALUE_SETS,
    env_of,
    kubectl,
    objects,
    one,
    render_deploy,
    rendered,
    server_container,
)

EXAMPLE = ROOT / "examples" / "model_repository"
DOCS = ROOT / "docs" / "model-repository.md"
EXAMPLE_MODELS = ("mlp", "add_mul", "tuple_out")
#: Variables the repository adds to the server container.
REPOSITORY_ENV = {
    "SPLITSERVE_MODEL_REPOSITORY",
    "SPLITSERVE_MODEL_CONTROL_MODE",
    "SPLITSERVE_REPOSITORY_POLL_SECS",
    "SPLITSERVE_LOAD_MODEL",
}
#: Where the image source's init container mounts the emptyDir it copies into.
COPY_DIR = "/mnt/model-repository"
REPOSITORY_SETS = ["repository-pvc", "repository-configmap", "repository-image"]


def _notes(chart, values: dict[str, Any]) -> str:
    return chart.render(values, name="splitserve", namespace="ml")["splitserve/templates/NOTES.txt"]


def _pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def _env(objs: list[dict[str, Any]]) -> dict[str, str | None]:
    return {k: v.get("value") for k, v in env_of(server_container(one(objs, "Deployment"))).items()}


def _repo_volume(pod: dict[str, Any]) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model-repository"]
    return volume


def _repo_mount(container: dict[str, Any]) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-repository"]
    return mount


def _validate(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        if obj["kind"] in ("ServiceMonitor", "PrometheusRule", "ServingRuntime"):
            continue
        kubernetes_validate.validate(obj, kv.latest_version(), strict=True)


def _repo_values(**settings: Any) -> dict[str, Any]:
    """modelRepository values: a PVC source plus the settings given."""
    values = {"enabled": True, "source": "pvc", "pvc": {"claimName": "model-repository"}}
    values.update(settings)
    return {"modelRepository": values}


def _cm_item(key: str, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "modelRepository": {
            "enabled": True,
            "source": "configMap",
            "configMap": {"name": "repo", "items": [{"key": key, "path": path, **extra}]},
        }
    }


# ------------------------------------------------------------------ off by default


def test_default_values_have_no_repository() -> None:
    objs = objects("default")
    env = _env(objs)
    assert not REPOSITORY_ENV & env.keys()
    # config.models is empty by default: the chart still serves the built-in MLP, as before.
    assert env["SPLITSERVE_MODEL"] == "mlp=builtin:mlp:512x1024x512"
    pod = _pod(objs)
    assert "model-repository" not in {v["name"] for v in pod["volumes"]}
    notes = rendered("default")["splitserve/templates/NOTES.txt"]
    assert "Models: mlp=builtin:mlp:512x1024x512 (the first is the default)" in notes
    assert "Model repository" not in notes


def test_values_default_to_poll_every_15_seconds() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    repo = values["modelRepository"]
    assert repo["enabled"] is False
    assert (repo["mountPath"], repo["controlMode"], repo["pollSecs"], repo["loadModels"]) == ("/models", "poll", 15, [])
    assert values["config"]["models"] == []


# ------------------------------------------------------------------ the server's variables


@pytest.mark.parametrize(
    "key, want",
    [
        (
            "repository-pvc",
            {
                "SPLITSERVE_MODEL_REPOSITORY": "/models",
                "SPLITSERVE_MODEL_CONTROL_MODE": "poll",
                "SPLITSERVE_REPOSITORY_POLL_SECS": "30",
            },
        ),
        ("repository-configmap", {"SPLITSERVE_MODEL_REPOSITORY": "/models", "SPLITSERVE_MODEL_CONTROL_MODE": "none"}),
        (
            "repository-image",
            {
                "SPLITSERVE_MODEL_REPOSITORY": "/models",
                "SPLITSERVE_MODEL_CONTROL_MODE": "explicit",
                "SPLITSERVE_LOAD_MODEL": "*",
            },
        ),
        (
            "all",
            {
                "SPLITSERVE_MODEL_REPOSITORY": "/model-repository",
                "SPLITSERVE_MODEL_CONTROL_MODE": "explicit",
                "SPLITSERVE_LOAD_MODEL": "mlp,add_mul",
            },
        ),
    ],
)
def test_repository_settings_reach_the_server(key: str, want: dict[str, str]) -> None:
    env = _env(objects(key))
    assert {k: env[k] for k in REPOSITORY_ENV if k in env} == want
    # The variable names are those of the server's flags (--model-repository, ...).
    c = server_container(one(objects(key), "Deployment"))
    assert env["SPLITSERVE_MODEL_REPOSITORY"] == _repo_mount(c)["mountPath"]


@pytest.mark.parametrize("key", REPOSITORY_SETS)
def test_repository_alone_gets_no_builtin_model(key: str) -> None:
    """No config.models: no SPLITSERVE_MODEL, so the binary adds no built-in default."""
    env = _env(objects(key))
    assert "SPLITSERVE_MODEL" not in env
    assert "SPLITSERVE_WARMUP_SHAPE" not in env
    notes = rendered(key)["splitserve/templates/NOTES.txt"]
    assert "Models:" not in notes and "builtin:" not in notes
    assert "Model repository: /models (read-only)" in notes


def test_repository_and_config_models_together(chart) -> None:
    values = {
        "config": {"models": [{"name": "enc", "spec": "builtin:scale:2", "warmupShape": "1x4"}]},
        **_repo_values(),
    }
    objs = render_values(chart, values)
    env = _env(objs)
    assert env["SPLITSERVE_MODEL"] == "enc=builtin:scale:2"
    assert env["SPLITSERVE_WARMUP_SHAPE"] == "enc=1x4"
    assert env["SPLITSERVE_MODEL_REPOSITORY"] == "/models"
    notes = _notes(chart, values)
    assert "Models: enc=builtin:scale:2 (the first is the default)" in notes
    assert "Model repository: /models (read-only), from PersistentVolumeClaim model-repository" in notes
    _validate(objs)


@pytest.mark.parametrize("secs", [1, 7, 86400])
def test_poll_interval_reaches_the_container(chart, secs: int) -> None:
    objs = render_values(chart, _repo_values(controlMode="poll", pollSecs=secs))
    env = _env(objs)
    assert env["SPLITSERVE_MODEL_CONTROL_MODE"] == "poll"
    # Digits, never 8.64e+04 (values arrive as floats in templates).
    assert env["SPLITSERVE_REPOSITORY_POLL_SECS"] == str(secs)
    assert "SPLITSERVE_LOAD_MODEL" not in env
    assert f"poll mode: rescanned every {secs}s" in _notes(chart, _repo_values(controlMode="poll", pollSecs=secs))


def test_poll_is_the_default_control_mode(chart) -> None:
    env = _env(render_values(chart, _repo_values()))
    assert env["SPLITSERVE_MODEL_CONTROL_MODE"] == "poll"
    assert env["SPLITSERVE_REPOSITORY_POLL_SECS"] == "15"


@pytest.mark.parametrize(
    "settings, want",
    [
        ({"controlMode": "none"}, {"SPLITSERVE_MODEL_CONTROL_MODE": "none"}),
        # No interval outside poll mode; loadModels empty: nothing loaded at start.
        ({"controlMode": "explicit", "pollSecs": 5}, {"SPLITSERVE_MODEL_CONTROL_MODE": "explicit"}),
        (
            {"controlMode": "explicit", "loadModels": ["mlp", "tuple_out"]},
            {"SPLITSERVE_MODEL_CONTROL_MODE": "explicit", "SPLITSERVE_LOAD_MODEL": "mlp,tuple_out"},
        ),
    ],
)
def test_other_control_modes(chart, settings: dict[str, Any], want: dict[str, str]) -> None:
    env = _env(render_values(chart, _repo_values(**settings)))
    got = {k: env[k] for k in REPOSITORY_ENV - {"SPLITSERVE_MODEL_REPOSITORY"} if k in env}
    assert got == want


def test_extra_env_replaces_a_repository_variable(chart) -> None:
    values = {**_repo_values(), "extraEnv": [{"name": "SPLITSERVE_REPOSITORY_POLL_SECS", "value": "2"}]}
    env_list = server_container(one(render_values(chart, values), "Deployment"))["env"]
    assert [e["value"] for e in env_list if e["name"] == "SPLITSERVE_REPOSITORY_POLL_SECS"] == ["2"]


def test_kserve_runtime_ignores_the_repository() -> None:
    """The ServingRuntime serves KServe's /mnt/models, never the Deployment's repository."""
    runtime = one(objects("all"), "ServingRuntime")
    (c,) = runtime["spec"]["containers"]
    names = {e["name"] for e in c["env"]}
    assert not REPOSITORY_ENV & names
    assert [v["name"] for v in runtime["spec"]["volumes"]] == ["tmp"]


# ------------------------------------------------------------------ sources, mounted read-only


@pytest.mark.parametrize("key", [*REPOSITORY_SETS, "all", "all-pvc"])
def test_server_mounts_the_repository_read_only(key: str) -> None:
    pod = _pod(objects(key))
    for c in pod["containers"]:
        mounts = [m for m in c.get("volumeMounts", []) if m["name"] == "model-repository"]
        if c["name"] == "splitserve":
            (mount,) = mounts
            assert mount["readOnly"] is True, mount
        else:
            assert not mounts, c["name"]
    # Only the image source's init container writes, into its own emptyDir.
    writers = [
        c["name"]
        for c in pod.get("initContainers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] == "model-repository" and not m.get("readOnly")
    ]
    assert writers == (["copy-model-repository"] if "emptyDir" in _repo_volume(pod) else [])


def test_pvc_source() -> None:
    pod = _pod(objects("repository-pvc"))
    assert _repo_volume(pod) == {
        "name": "model-repository",
        "persistentVolumeClaim": {"claimName": "model-repository", "readOnly": True},
    }
    assert _repo_mount(server_container_of(pod)) == {
        "name": "model-repository",
        "mountPath": "/models",
        "readOnly": True,
        "subPath": "triton",
    }
    assert "initContainers" not in pod


def test_pvc_source_without_sub_path(chart) -> None:
    pod = _pod(render_values(chart, _repo_values()))
    assert "subPath" not in _repo_mount(server_container_of(pod))


def test_configmap_source_builds_the_layout_from_items() -> None:
    pod = _pod(objects("repository-configmap"))
    volume = _repo_volume(pod)["configMap"]
    assert volume["name"] == "model-repository"
    assert volume["items"] == VALUE_SETS["repository-configmap"]["modelRepository"]["configMap"]["items"]
    assert {i["path"] for i in volume["items"]} >= {"mlp/config.pbtxt", "mlp/1/model.pt"}
    # Readable by the server's group (fsGroup), by no one else.
    assert volume["defaultMode"] == 0o440
    # A whole-volume mount: the kubelet swaps in a changed ConfigMap only without subPath.
    assert _repo_mount(server_container_of(pod)) == {"name": "model-repository", "mountPath": "/models", "readOnly": True}
    assert "initContainers" not in pod
    # The chart does not create the ConfigMap: only the dashboard's is rendered.
    assert [o["metadata"]["name"] for o in objects("repository-configmap") if o["kind"] == "ConfigMap"] == [
        "splitserve-dashboards"
    ]


def test_configmap_source_without_fs_group_is_world_readable(chart) -> None:
    values = {
        "modelRepository": {
            "enabled": True,
            "source": "configMap",
            "configMap": {"name": "repo", "items": [{"key": "a.config.pbtxt", "path": "a/config.pbtxt"}]},
        },
        "podSecurityContext": {"fsGroup": None},
    }
    objs = render_values(chart, values)
    assert _repo_volume(_pod(objs))["configMap"]["defaultMode"] == 0o444
    _validate(objs)


def _copy_container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod["initContainers"] if c["name"] == "copy-model-repository"]
    return c


def test_image_source_copies_into_an_empty_dir() -> None:
    pod = _pod(objects("repository-image"))
    repo = VALUE_SETS["repository-image"]["modelRepository"]
    init = _copy_container(pod)
    # The digest wins over the tag.
    assert init["image"] == f"registry.example.com/ml/model-repository@{repo['image']['digest']}"
    assert init["imagePullPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env == {"SOURCE_DIR": "/srv/model_repository", "MODEL_REPOSITORY": COPY_DIR}
    assert {"name": "model-repository", "mountPath": COPY_DIR} in init["volumeMounts"]
    assert init["resources"] == repo["image"]["resources"]
    assert _repo_volume(pod) == {"name": "model-repository", "emptyDir": {"sizeLimit": "4Gi"}}
    assert _repo_mount(server_container_of(pod)) == {"name": "model-repository", "mountPath": "/models", "readOnly": True}


def test_image_source_with_a_tag(chart) -> None:
    values = _repo_values(source="image", image={"repository": "models", "tag": "v3"})
    pod = _pod(render_values(chart, values))
    assert _copy_container(pod)["image"] == "models:v3"
    assert _copy_container(pod)["env"][0] == {"name": "SOURCE_DIR", "value": "/models"}
    notes = _notes(chart, values)
    assert "from /models of image models:v3 (copied when a pod starts)" in notes
    assert "a new image tag rolls out new pods" in notes


@pytest.mark.parametrize("key", ["repository-image", "all"])
def test_init_container_runs_as_locked_down_as_the_server(key: str) -> None:
    pod = _pod(objects(key))
    server = server_container_of(pod)
    init = _copy_container(pod)
    assert init["securityContext"] == server["securityContext"]
    sc = init["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # Only the emptyDir and /tmp are writable: the image's own files stay read-only.
    assert {m["mountPath"] for m in init["volumeMounts"]} == {COPY_DIR, "/tmp"}


def test_image_source_follows_a_changed_security_context(chart) -> None:
    values = {
        **_repo_values(source="image", image={"repository": "models", "tag": "v3"}),
        "securityContext": {"runAsUser": 2000, "runAsNonRoot": True, "readOnlyRootFilesystem": True},
    }
    pod = _pod(render_values(chart, values))
    sc = _copy_container(pod)["securityContext"]
    assert sc == server_container_of(pod)["securityContext"]
    assert sc["runAsUser"] == 2000 and sc["capabilities"] == {"drop": ["ALL"]}


def _copy_script(pod: dict[str, Any]) -> list[str]:
    command = _copy_container(pod)["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return command


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_copy_script_copies_the_nested_layout(tmp_path: Path) -> None:
    """The init container's script, run by sh: the whole tree, hidden files too."""
    command = _copy_script(_pod(objects("repository-image")))
    src, dst = tmp_path / "image" / "models", tmp_path / "empty-dir"
    (src / "mlp" / "1").mkdir(parents=True)
    (src / "mlp" / "config.pbtxt").write_text('name: "mlp"\n')
    (src / "mlp" / "1" / "model.pt").write_bytes(b"\x00PK\xff")
    (src / ".keep").write_text("")
    dst.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOURCE_DIR": str(src), "MODEL_REPOSITORY": str(dst)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    copied = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert copied == [".keep", "mlp/1/model.pt", "mlp/config.pbtxt"]
    assert (dst / "mlp" / "1" / "model.pt").read_bytes() == b"\x00PK\xff"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_copy_script_fails_on_a_wrong_path(tmp_path: Path) -> None:
    command = _copy_script(_pod(objects("repository-image")))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SOURCE_DIR": str(tmp_path / "nothing"),
        "MODEL_REPOSITORY": str(tmp_path),
    }
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "no directory" in proc.stderr and "modelRepository.image.path" in proc.stderr


def server_container_of(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "splitserve")


# ------------------------------------------------------------------ NOTES.txt


def test_notes_describe_each_source_and_mode() -> None:
    pvc = rendered("repository-pvc")["splitserve/templates/NOTES.txt"]
    assert "from PersistentVolumeClaim model-repository (subPath triton)" in pvc
    assert "poll mode: rescanned every 30s" in pvc
    cm = rendered("repository-configmap")["splitserve/templates/NOTES.txt"]
    assert "from ConfigMap model-repository (6 of its keys)" in cm
    assert "control mode none" in cm and "rollout restart" in cm
    image = rendered("repository-image")["splitserve/templates/NOTES.txt"]
    assert "explicit mode: loaded at start: *" in image
    assert "curl -sf -X POST localhost:8000/v2/repository/models/NAME/load" in image


def test_notes_warn_about_explicit_mode_with_several_pods(chart) -> None:
    explicit = _repo_values(controlMode="explicit", loadModels=["mlp"])
    # Two replicas by default, or an HPA: each pod loads on its own.
    assert "WARNING: this release runs several pods" in _notes(chart, explicit)
    assert "(hpa.enabled)" in _notes(chart, {**explicit, "hpa": {"enabled": True}})
    assert "several pods" not in _notes(chart, {**explicit, "replicaCount": 1})
    assert "several pods" not in _notes(chart, _repo_values(controlMode="poll"))


def test_notes_for_explicit_mode_over_tls_with_tokens() -> None:
    notes = rendered("all")["splitserve/templates/NOTES.txt"]
    (load,) = [line for line in notes.splitlines() if "/v2/repository/models/NAME/load" in line]
    assert "--cacert ca.crt" in load and 'authorization: Bearer $TOKEN' in load
    assert "https://splitserve.ml.svc:80/v2/repository/models/NAME/load" in load
    assert "with a token of scope repository" in notes


# ------------------------------------------------------------------ training repository models


def test_training_with_only_repository_models(chart) -> None:
    """Trainable repository models (splitserve.trainable in config.pbtxt) get the training pod."""
    values = {**_repo_values(), "training": {"enabled": True}}
    objs = render_values(chart, values)
    env = _env(objs)
    assert "SPLITSERVE_TRAINABLE" not in env  # the config.pbtxt files say which models train
    assert env["SPLITSERVE_CHECKPOINT_DIR"] == "/var/lib/splitserve/checkpoints"
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    notes = _notes(chart, values)
    assert "the repository's models whose config.pbtxt sets splitserve.trainable" in notes
    _validate(objs)


def test_notes_say_repository_models_may_train_without_the_training_pod() -> None:
    notes = rendered("repository-pvc")["splitserve/templates/NOTES.txt"]
    assert "No model of config.models is trainable" in notes
    assert "splitserve.trainable" in notes and "No model is trainable" not in notes


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"modelRepository": {"enable": True}}, "enable"),
        ({"modelRepository": {"pollSeconds": 5}}, "pollSeconds"),
        ({"modelRepository": {"enabled": True, "source": "s3"}}, "/modelRepository/source"),
        ({"modelRepository": {"source": "hostPath"}}, "/modelRepository/source"),
        ({"modelRepository": {"controlMode": "auto"}}, "/modelRepository/controlMode"),
        ({"modelRepository": {"controlMode": "POLL"}}, "/modelRepository/controlMode"),
        ({"modelRepository": {"pollSecs": 0}}, "/modelRepository/pollSecs"),
        ({"modelRepository": {"pollSecs": -15}}, "/modelRepository/pollSecs"),
        ({"modelRepository": {"pollSecs": 86401}}, "/modelRepository/pollSecs"),
        ({"modelRepository": {"pollSecs": "15"}}, "/modelRepository/pollSecs"),
        ({"modelRepository": {"pollSecs": 1.5}}, "/modelRepository/pollSecs"),
        ({"modelRepository": {"mountPath": "models"}}, "/modelRepository/mountPath"),
        ({"modelRepository": {"enabled": True}}, "/modelRepository/pvc/claimName"),
        ({"modelRepository": {"enabled": True, "pvc": {"claimName": "Models_PVC"}}}, "/modelRepository/pvc/claimName"),
        ({"modelRepository": {"enabled": True, "pvc": {"claim": "models"}}}, "claim"),
        ({"modelRepository": {"enabled": True, "source": "configMap"}}, "/modelRepository/configMap"),
        (
            {"modelRepository": {"enabled": True, "source": "configMap", "configMap": {"name": "repo"}}},
            "/modelRepository/configMap/items",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "configMap",
                                 "configMap": {"items": [{"key": "a", "path": "m/config.pbtxt"}]}}},
            "/modelRepository/configMap/name",
        ),
        (_cm_item("mlp.config.pbtxt", "/mlp/config.pbtxt"), "/modelRepository/configMap/items/0/path"),
        (_cm_item("mlp.config.pbtxt", "../mlp/config.pbtxt"), "/modelRepository/configMap/items/0/path"),
        (_cm_item("mlp.config.pbtxt", "mlp/../../etc/passwd"), "/modelRepository/configMap/items/0/path"),
        (_cm_item("mlp.config.pbtxt", "config.pbtxt"), "/modelRepository/configMap/items/0/path"),
        (_cm_item("mlp/config.pbtxt", "mlp/config.pbtxt"), "/modelRepository/configMap/items/0/key"),
        (_cm_item("mlp.config.pbtxt", "mlp/config.pbtxt", mode=0o644), "mode"),
        ({"modelRepository": {"enabled": True, "source": "image"}}, "/modelRepository/image"),
        (
            {"modelRepository": {"enabled": True, "source": "image", "image": {"repository": "models"}}},
            "/modelRepository/image",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "image", "image": {"repository": "m", "tag": "1",
                                                                               "digest": "latest"}}},
            "/modelRepository/image/digest",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "image", "image": {"repository": "m", "tag": "1",
                                                                               "path": "models"}}},
            "/modelRepository/image/path",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "image", "image": {"repository": "m", "tag": "1",
                                                                               "command": ["cp"]}}},
            "command",
        ),
        # loadModels only in explicit mode: poll and none load every model, and the server refuses it.
        ({**_repo_values(loadModels=["mlp"])}, "/modelRepository/loadModels"),
        ({**_repo_values(controlMode="none", loadModels=["mlp"])}, "/modelRepository/loadModels"),
        ({"modelRepository": {"controlMode": "explicit", "loadModels": ["mlp"]}}, "/modelRepository/loadModels"),
        ({**_repo_values(controlMode="explicit", loadModels=["*", "mlp"])}, "/modelRepository/loadModels"),
        ({**_repo_values(controlMode="explicit", loadModels=["a,b"])}, "/modelRepository/loadModels/0"),
        ({**_repo_values(controlMode="explicit", loadModels=["mlp", "mlp"])}, "/modelRepository/loadModels"),
        ({**_repo_values(controlMode="explicit", loadModels="mlp")}, "/modelRepository/loadModels"),
        # Training without training.models is only for trainable repository models.
        ({"training": {"enabled": True}, "modelRepository": {"enabled": False}}, "/training/models"),
    ],
)
def test_schema_refuses_nonsense(chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(complaint)):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name="splitserve", namespace="ml")


@pytest.mark.parametrize(
    "values",
    [
        # Off: the sources' settings need not be complete.
        {"modelRepository": {"enabled": False, "source": "image"}},
        {"modelRepository": {"enabled": False, "source": "configMap"}},
        _repo_values(controlMode="explicit", loadModels=["*"]),
        _repo_values(controlMode="explicit", loadModels=["mlp", "add_mul", "model-2.v1"]),
        _repo_values(source="image", image={"repository": "m", "digest": "sha256:" + "ab" * 32, "tag": ""}),
        _cm_item("mlp.1.model.pt", "mlp/1/model.pt"),
        _cm_item("x", "my-model_2/10/model.pt"),
    ],
)
def test_schema_accepts_sensible_values(chart, values: dict[str, Any]) -> None:
    chart.validate_schema(values)
    _validate(render_values(chart, values))


@pytest.mark.parametrize(
    "values, complaint",
    [
        # The default model source's mount path is /models too.
        (
            {**_repo_values(), "modelSource": {"type": "pvc", "pvc": {"claimName": "models"}}},
            "modelRepository.mountPath /models overlaps /models",
        ),
        (
            {**_repo_values(mountPath="/models/repository"),
             "modelSource": {"type": "pvc", "pvc": {"claimName": "models"}}},
            "modelRepository.mountPath /models/repository overlaps /models",
        ),
        (_repo_values(mountPath="/tmp"), "modelRepository.mountPath /tmp overlaps /tmp"),
        (_repo_values(mountPath="/etc/splitserve"), "overlaps /etc/splitserve/tls"),
        (
            {**_repo_values(mountPath="/var/lib/splitserve"), "training": {"enabled": True}},
            "overlaps /var/lib/splitserve/checkpoints",
        ),
        (
            _repo_values(source="image", image={"repository": "m", "tag": "1", "path": "/mnt"}),
            "modelRepository.image.path /mnt overlaps /mnt/model-repository",
        ),
        (
            _repo_values(source="image", image={"repository": "m", "tag": "1", "path": "/mnt/model-repository/"}),
            "overlaps /mnt/model-repository",
        ),
    ],
)
def test_templates_refuse_overlapping_mounts(chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        chart.render(values, name="splitserve", namespace="ml")


def test_repository_beside_a_model_source_on_another_path(chart) -> None:
    values = {**_repo_values(mountPath="/model-repository"), "modelSource": {"type": "pvc", "pvc": {"claimName": "models"}}}
    objs = render_values(chart, values)
    mounts = {m["name"]: m["mountPath"] for m in server_container(one(objs, "Deployment"))["volumeMounts"]}
    assert mounts["models"] == "/models" and mounts["model-repository"] == "/model-repository"
    _validate(objs)


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"modelRepository": {"enabled": True}}, "modelRepository.source=pvc needs modelRepository.pvc.claimName"),
        (
            {"modelRepository": {"enabled": True, "source": "configMap", "configMap": {"name": "repo"}}},
            "modelRepository.source=configMap needs modelRepository.configMap.items",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "configMap"}},
            "modelRepository.source=configMap needs modelRepository.configMap.name",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "image"}},
            "modelRepository.source=image needs modelRepository.image.repository",
        ),
        (
            {"modelRepository": {"enabled": True, "source": "image", "image": {"repository": "m"}}},
            "modelRepository.source=image needs modelRepository.image.tag or modelRepository.image.digest",
        ),
        (_repo_values(loadModels=["mlp"]), "modelRepository.loadModels is for controlMode explicit (now poll"),
        ({"modelRepository": {"loadModels": ["mlp"]}}, "modelRepository.loadModels is set but modelRepository.enabled is false"),
        ({"training": {"enabled": True}}, "training.enabled needs training.models"),
    ],
)
def test_templates_refuse_nonsense_even_unchecked(tmp_path: Path, values: dict[str, Any], complaint: str) -> None:
    """The same mistakes fail the render when the schema is not there to catch them."""
    schemaless = tmp_path / "splitserve"
    shutil.copytree(CHART, schemaless)
    (schemaless / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        render_deploy.render_chart(values, chart=schemaless)


# ------------------------------------------------------------------ the documentation's YAML


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def _documented_values() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in (CHART / "README.md", DOCS):
        for i, block in enumerate(_yaml_blocks(path)):
            doc = yaml.safe_load(block)
            if isinstance(doc, dict) and "modelRepository" in doc:
                out.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return out


def test_the_docs_show_each_source() -> None:
    sources = {doc["modelRepository"].get("source", "pvc") for _, doc in _documented_values()}
    assert sources == {"pvc", "configMap", "image"}


@pytest.mark.parametrize("where, values", _documented_values(), ids=[w for w, _ in _documented_values()])
def test_documented_valuesrender_values(chart, where: str, values: dict[str, Any]) -> None:
    chart.validate_schema(values)
    objs = render_values(chart, values)
    _validate(objs)
    assert _env(objs)["SPLITSERVE_MODEL_REPOSITORY"] == values["modelRepository"].get("mountPath", "/models")


def test_documented_kustomize_patch_applies_to_deploy(tmp_path: Path) -> None:
    """docs/model-repository.md, "Without Helm": the patch on top of deploy/overlays/cpu."""
    (patch,) = [b for b in _yaml_blocks(DOCS) if "kind: Deployment" in b]
    (tmp_path / "repository.yaml").write_text(patch, encoding="utf-8")
    overlay = os.path.relpath(ROOT / "deploy" / "overlays" / "cpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [overlay], "patches": [{"path": "repository.yaml"}]}), encoding="utf-8"
    )
    proc = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    _validate(objs)
    pod = _pod(objs)
    env = {k: v.get("value") for k, v in env_of(server_container(one(objs, "Deployment"))).items()}
    assert "SPLITSERVE_MODEL" not in env
    assert env["SPLITSERVE_MODEL_REPOSITORY"] == "/models"
    assert _repo_mount(server_container_of(pod))["readOnly"] is True
    assert _repo_volume(pod)["persistentVolumeClaim"]["readOnly"] is True


# ------------------------------------------------------------------ examples/model_repository


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """inference.ModelConfig, compiled from proto/inference/model_config.proto."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (requirements.txt) compiles the proto")
    out = tmp_path_factory.mktemp("proto")
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         str(ROOT / "proto" / "inference" / "model_config.proto")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("inference.model_config_pb2")
    finally:
        sys.path.remove(str(out))
    return module


def _parse(model_config, name: str):
    from google.protobuf import text_format

    text = (EXAMPLE / name / "config.pbtxt").read_text(encoding="utf-8")
    return text_format.Parse(text, model_config.ModelConfig())


def test_example_repository_layout() -> None:
    dirs = sorted(p.name for p in EXAMPLE.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert dirs == sorted(EXAMPLE_MODELS)
    for name in EXAMPLE_MODELS:
        assert (EXAMPLE / name / "config.pbtxt").is_file(), name
    # model.pt files are generated, never committed.
    proc = subprocess.run(
        ["git", "ls-files", "--", str(EXAMPLE.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True
    )
    assert not [f for f in proc.stdout.splitlines() if f.endswith(".pt")], proc.stdout
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str((EXAMPLE / "mlp" / "7" / "model.pt").relative_to(ROOT))], cwd=ROOT
    )
    assert ignored.returncode == 0, "examples/model_repository/.gitignore must ignore */*/model.pt"


def test_example_configs_are_tritons_model_config(model_config) -> None:
    mc = model_config
    fp32 = mc.DataType.Value("TYPE_FP32")
    configs = {name: _parse(mc, name) for name in EXAMPLE_MODELS}
    for name, c in configs.items():
        assert c.name == name
        assert c.platform == "pytorch_libtorch"
        # Only mlp reserves a worker: the three fit a 2-core pod's workers.
        want = [(1, mc.ModelInstanceGroup.Kind.Value("KIND_CPU"))] if name == "mlp" else []
        assert [(g.count, g.kind) for g in c.instance_group] == want, name
        assert all(t.data_type == fp32 for t in [*c.input, *c.output]), name
        # PyTorch backend names: the forward's arguments and the returned tuple's elements, by position.
        assert [t.name for t in c.input] == [f"INPUT__{i}" for i in range(len(c.input))]
        assert [t.name for t in c.output] == [f"OUTPUT__{i}" for i in range(len(c.output))]
        # No training in the example: splitserve's parameters are only documented.
        assert not any(k.startswith("splitserve.") for k in c.parameters), name

    mlp = configs["mlp"]
    assert mlp.max_batch_size == 8 and mlp.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in mlp.input] == [("INPUT__0", [8])]
    assert [(t.name, list(t.dims)) for t in mlp.output] == [("OUTPUT__0", [4])]
    assert mlp.version_policy.latest.num_versions == 1

    add_mul = configs["add_mul"]
    assert [list(t.dims) for t in add_mul.input] == [[4], [4]]
    assert [list(t.dims) for t in add_mul.output] == [[4], [4]]
    assert add_mul.version_policy.WhichOneof("policy_choice") == "all"

    tuple_out = configs["tuple_out"]
    assert [list(t.dims) for t in tuple_out.output] == [[4], [1]]
    assert list(tuple_out.version_policy.specific.versions) == [1]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_make_models_writes_a_repository_torch_runs(tmp_path: Path, model_config) -> None:
    torch = pytest.importorskip("torch", reason="torch comes with the project's venv (make setup)")
    out = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_models.py"), str(out), "--configmap", "model-repository"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        [f"{m}/config.pbtxt" for m in EXAMPLE_MODELS] + [f"{m}/1/model.pt" for m in EXAMPLE_MODELS]
    ), "config.pbtxt copied, model.pt written, no temporary files left"
    for name in EXAMPLE_MODELS:
        assert (out / name / "config.pbtxt").read_bytes() == (EXAMPLE / name / "config.pbtxt").read_bytes()

    # Each model on inputs of its configured shapes (a batch of 3 where max_batch_size > 0)
    # gives outputs of its configured shapes, as the config's tuple order says.
    for name in EXAMPLE_MODELS:
        c = _parse(model_config, name)
        batch = [3] if c.max_batch_size > 0 else []
        inputs = [torch.randn(batch + list(t.dims)) for t in c.input]
        module = torch.jit.load(str(out / name / "1" / "model.pt"))
        with torch.no_grad():
            result = module(*inputs)
        outputs = list(result) if isinstance(result, tuple) else [result]
        assert [list(t.shape) for t in outputs] == [batch + list(t.dims) for t in c.output], name
        assert all(t.dtype == torch.float32 for t in outputs), name
        if name == "add_mul":
            a, b = inputs
            assert torch.equal(outputs[0], a + b) and torch.equal(outputs[1], a * b)
        if name == "tuple_out":
            assert torch.allclose(outputs[0].sum(-1), torch.ones(3))
            assert torch.allclose(outputs[1], inputs[0].sum(-1, keepdim=True))

    # --configmap: the printed values serve exactly these files, and pass the chart's schema.
    values = yaml.safe_load(proc.stdout[proc.stdout.index("modelRepository:"):])
    items = values["modelRepository"]["configMap"]["items"]
    assert sorted(i["path"] for i in items) == files
    assert f"--from-file=mlp.1.model.pt={out / 'mlp' / '1' / 'model.pt'}" in proc.stdout
    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)

    # A second version appears beside the first; the same version again replaces its file.
    for args in (["--version", "2"], ["--version", "1"]):
        proc = subprocess.run(
            [sys.executable, str(EXAMPLE / "make_models.py"), str(out), *args],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "mlp").iterdir()) == ["1", "2", "config.pbtxt"]
    v1 = torch.jit.load(str(out / "mlp" / "1" / "model.pt"))
    v2 = torch.jit.load(str(out / "mlp" / "2" / "model.pt"))
    x = torch.ones(1, 8)
    assert not torch.equal(v1(x), v2(x)), "version 2 has other weights"
    assert not list(out.rglob(".*")), "no temporary files left"


def test_example_readme_documents_the_script_and_the_models() -> None:
    readme = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    for name in EXAMPLE_MODELS:
        assert f"`{name}`" in readme
    assert "make_models.py" in readme and "--configmap" in readme
    for key in ("splitserve.trainable", "splitserve.optimizer", "splitserve.learning_rate", "splitserve.warmup_shape"):
        assert key in readme, key


def test_docs_keep_the_kubernetes_section() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert text.startswith("# Model repository\n")
    assert "\n## On Kubernetes\n" in text
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["modelRepository"]
    for key in (k for k, v in values.items() if not isinstance(v, dict)):
        assert f"`modelRepository.{key}`" in text, key


def test_value_sets_cover_every_source() -> None:
    sources = {
        VALUE_SETS[k]["modelRepository"]["source"]
        for k in VALUE_SETS
        if VALUE_SETS[k].get("modelRepository", {}).get("enabled")
    }
    assert sources == {"pvc", "configMap", "image"}
    modes = {
        VALUE_SETS[k]["modelRepository"].get("controlMode", "poll")
        for k in VALUE_SETS
        if VALUE_SETS[k].get("modelRepository", {}).get("enabled")
    }
    assert modes == {"poll", "none", "explicit"}

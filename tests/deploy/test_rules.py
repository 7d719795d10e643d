"""dashboards/: the Prometheus alerts (checked and unit-tested with promtool) and
the Grafana dashboard (parses, has its variables, every query is valid PromQL
filtered by the dashboard's variables)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_support import DASHBOARDS, promtool

ALERTS = DASHBOARDS / "alerts.yaml"
ALERT_TESTS = DASHBOARDS / "alerts.test.yaml"
DASHBOARD = DASHBOARDS / "splitserve-contention.json"

EXPECTED_ALERTS = {
    "SplitserveQueueSaturated",
    "SplitserveHighRejectionRate",
    "SplitserveLatencyP99AboveObjective",
    "SplitserveWorkerStalled",
    "SplitserveThreadsAboveCpuBudget",
    "SplitserveCpuThrottled",
}


def run_promtool(*args: str, cwd: Path = DASHBOARDS) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


# ------------------------------------------------------------------ alerts


def test_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    proc = run_promtool("test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_rules_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a bad expression and a bad `for` are refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "groups:\n"
        "  - name: broken\n"
        "    rules:\n"
        "      - alert: Broken\n"
        "        expr: sum by (pod (splitserve_queue_depth) > 0\n"
        "        for: five minutes\n"
    )
    proc = run_promtool("check", "rules", str(broken), cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation makes `promtool test rules` fail: the suite checks something."""
    (tmp_path / "alerts.yaml").write_bytes(ALERTS.read_bytes())
    text = ALERT_TESTS.read_text(encoding="utf-8").replace("87.89%", "12.34%")
    assert "12.34%" in text
    (tmp_path / "alerts.test.yaml").write_text(text, encoding="utf-8")
    proc = run_promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert proc.returncode != 0


def test_every_alert_is_documented() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        for key in ("summary", "description", "runbook"):
            assert r["annotations"].get(key, "").strip(), f"{r['alert']}: no {key}"


def test_every_alert_has_firing_and_quiet_cases() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["alerts.yaml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == EXPECTED_ALERTS, f"no firing case for {EXPECTED_ALERTS - firing}"
    assert quiet == EXPECTED_ALERTS, f"no non-firing case for {EXPECTED_ALERTS - quiet}"


def test_thresholds_are_the_documented_ones() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    fors = {r["alert"]: r["for"] for r in alert_rules()}
    assert "> 0.8" in exprs["SplitserveQueueSaturated"] and fors["SplitserveQueueSaturated"] == "5m"
    assert "> 2.5" in exprs["SplitserveLatencyP99AboveObjective"]
    assert 'state="stalled"' in exprs["SplitserveWorkerStalled"] and fors["SplitserveWorkerStalled"] == "1m"
    assert "> 0.05" in exprs["SplitserveHighRejectionRate"]
    assert "> 0.25" in exprs["SplitserveCpuThrottled"]


# ------------------------------------------------------------------ dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def test_dashboard_identity(dashboard) -> None:
    assert dashboard["title"] == "splitserve — contention"
    assert dashboard["uid"] == "splitserve-contention"
    assert isinstance(dashboard["schemaVersion"], int)


def test_dashboard_variables(dashboard) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "pod", "model"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("namespace", "pod", "model"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}", name
        assert v["includeAll"] and v["multi"], name
        assert re.fullmatch(rf"label_values\(.+, {name}\)", v["query"]["query"]), name
    # Each variable narrows the next.
    assert '$namespace' in variables["pod"]["query"]["query"]
    assert '$pod' in variables["model"]["query"]["query"]


def test_every_panel_has_a_query(dashboard) -> None:
    ps = panels(dashboard)
    assert len(ps) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in ps:
        assert p.get("targets"), p["title"]
        assert any(t.get("expr", "").strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), p["title"]


#: Metrics whose series carry a model label, so panels filter them by $model.
MODEL_LABELLED = (
    "splitserve_requests_total",
    "splitserve_rejected_requests_total",
    "splitserve_queue_duration_seconds",
    "splitserve_inference_duration_seconds",
    "splitserve_request_duration_seconds",
    "splitserve_queue_depth",
    "splitserve_queue_capacity",
    "splitserve_batch_size",
)


def test_every_query_is_filtered_by_the_variables(dashboard) -> None:
    for p in panels(dashboard):
        for t in p["targets"]:
            expr = t["expr"]
            # Every selector in the query, not only the first one.
            for selector in re.findall(r"\b([a-z_:]+)\{([^}]*)\}", expr):
                metric, labels = selector
                where = f"{p['title']}: {metric}"
                assert 'namespace=~"$namespace"' in labels, where
                assert 'pod=~"$pod"' in labels, where
                if metric.startswith(MODEL_LABELLED):
                    assert 'model=~"$model"' in labels, where
            assert re.search(r"\b[a-z_:]+\{", expr), f"{p['title']}: query without a selector"


def test_dashboard_covers_the_contention_signals(dashboard) -> None:
    exprs = "\n".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    for metric in (
        "splitserve_requests_total",
        "splitserve_queue_duration_seconds_bucket",
        "splitserve_inference_duration_seconds_bucket",
        "splitserve_request_duration_seconds_bucket",
        "splitserve_queue_depth",
        "splitserve_queue_capacity",
        "splitserve_rejected_requests_total",
        "splitserve_batch_size_bucket",
        "splitserve_threads",
        "splitserve_cpu_budget_cores",
        'splitserve_context_switches_total{namespace=~"$namespace", pod=~"$pod", kind="involuntary"}',
        "splitserve_cgroup_cpu_throttled_seconds_total",
        "splitserve_cgroup_cpu_throttled_periods_total",
        "process_resident_memory_bytes",
        "splitserve_gpu_memory_used_bytes",
        "splitserve_gpu_memory_total_bytes",
        "splitserve_workers",
        "splitserve_inflight_requests",
    ):
        assert metric in exprs, metric
    for pool in ("process", "io", "inference", "intra_op", "inter_op"):
        assert re.search(rf'pool=~"[^"]*\b{pool}\b', exprs), pool
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(splitserve_queue_duration" in exprs


def test_every_dashboard_query_is_valid_promql(dashboard, tmp_path: Path) -> None:
    """promtool parses each panel query and variable query as a recording rule."""
    rules = []
    for p in panels(dashboard):
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "5m")
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), \w+\)", v["query"]["query"]).group(1)
            rules.append({"record": f"dashboard:var:{v['name']}", "expr": inner})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""dashboards/: the Prometheus alerts (rendered from the chart, checked and
unit-tested with promtool, thresholds from the values, a runbook for each) and
the Grafana dashboard (parses, has its variables, every query is valid PromQL
filtered by the dashboard's variables, no made-up percentiles)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_support import CHART, DASHBOARDS, ROOT, promtool, render_deploy

ALERTS = DASHBOARDS / "alerts.yaml"
ALERT_TESTS = DASHBOARDS / "alerts.test.yaml"
DASHBOARD = DASHBOARDS / "splitserve-contention.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
OBSERVABILITY = ROOT / "docs" / "observability.md"

EXPECTED_ALERTS = {
    "SplitserveQueueSaturated",
    "SplitserveHighRejectionRate",
    "SplitserveInternalErrors",
    "SplitserveLatencyP99AboveObjective",
    "SplitserveTargetDown",
    "SplitservePodsNotReady",
    "SplitserveWorkerStalled",
    "SplitserveRepositoryLoadFailed",
    "SplitserveThreadsAboveCpuBudget",
    "SplitserveCpuThrottled",
}

#: Alert -> the prometheusRule.thresholds value its expression compares with.
THRESHOLDS = {
    "SplitserveQueueSaturated": "queueSaturationRatio",
    "SplitserveHighRejectionRate": "rejectionRatio",
    "SplitserveInternalErrors": "internalErrorsPerSecond",
    "SplitserveLatencyP99AboveObjective": "p99LatencySeconds",
    "SplitserveCpuThrottled": "cpuThrottledSecondsPerSecond",
}


def default_thresholds() -> dict[str, float]:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return values["prometheusRule"]["thresholds"]


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
    runbooks = RUNBOOKS.read_text(encoding="utf-8")
    table = OBSERVABILITY.read_text(encoding="utf-8")
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        for key in ("summary", "description", "runbook_url"):
            assert r["annotations"].get(key, "").strip(), f"{name}: no {key}"
        # The conventional annotation, linking to the alert's section of docs/runbooks.md.
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert r["annotations"]["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
        assert re.search(rf"^## {name}$", runbooks, re.M), f"docs/runbooks.md has no section {name}"
        # docs/observability.md lists it, with its runbook.
        row = re.search(rf"^\| `{name}` \|.*$", table, re.M)
        assert row, f"docs/observability.md: no row for {name}"
        assert f"(runbooks.md#{name.lower()})" in row.group(0), name
    sections = re.findall(r"^## (\w+)$", runbooks, re.M)
    assert sorted(sections) == sorted(EXPECTED_ALERTS), "a runbook section without its alert"


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
    thresholds = default_thresholds()
    assert set(thresholds) == set(THRESHOLDS.values())
    assert thresholds["p99LatencySeconds"] == 0.25, "a millisecond-scale objective, not seconds"
    table = OBSERVABILITY.read_text(encoding="utf-8")
    for alert, key in THRESHOLDS.items():
        value = thresholds[key]
        # The comparison ends the expression: `... > <threshold>`.
        assert re.search(rf">\s*{re.escape(str(value))}\s*$", exprs[alert]), (alert, exprs[alert])
        row = re.search(rf"^\| `{alert}` \|.*$", table, re.M).group(0)
        assert f"`{key}`" in row, f"docs/observability.md does not name {key} for {alert}"
    assert fors["SplitserveQueueSaturated"] == "5m"
    assert 'state="stalled"' in exprs["SplitserveWorkerStalled"] and fors["SplitserveWorkerStalled"] == "1m"
    assert 'code="INTERNAL"' in exprs["SplitserveInternalErrors"]
    assert 'up{job="splitserve"} == 0' in exprs["SplitserveTargetDown"]
    assert "kube_deployment_status_replicas_unavailable" in exprs["SplitservePodsNotReady"]


def test_window_and_for_match_the_text() -> None:
    """What an alert says about time is what its query and `for` do."""
    for r in alert_rules():
        text = " ".join(r["annotations"][k] for k in ("summary", "description"))
        windows = set(re.findall(r"\[(\d+)m\]", r["expr"]))
        # "over (the last) N minutes" is the query's range; "for (the last) N minutes" its `for`.
        over = set(re.findall(r"over\s+(?:the\s+last\s+)?(\d+)\s+minutes", text))
        held = set(re.findall(r"for\s+(?:the\s+last\s+)?(\d+)\s+minutes", text))
        assert over <= windows, f"{r['alert']}: text says over {over} minutes, the query uses {windows}"
        assert held <= {r["for"].removesuffix("m")}, f"{r['alert']}: text says for {held} minutes, for: {r['for']}"
        assert over | held or r["alert"] in {"SplitserveWorkerStalled", "SplitserveThreadsAboveCpuBudget"}, r["alert"]


def test_alert_file_is_the_chart_rendered_with_defaults() -> None:
    assert ALERTS.read_text(encoding="utf-8") == render_deploy.alert_rules_file(), (
        "dashboards/alerts.yaml is stale: run .venv/bin/python scripts/render_deploy.py"
    )


def test_thresholds_and_job_come_from_the_values(tmp_path: Path) -> None:
    """Every threshold reaches its expression: raised above what the unit tests'
    firing cases reach, those alerts stay quiet; another job name silences
    SplitserveTargetDown; the runbook URL is the value's."""
    raised = {
        "queueSaturationRatio": 0.9,          # the test queue is 87.89% full
        "rejectionRatio": 0.2,                # 10% rejected
        "internalErrorsPerSecond": 0.5,       # 1 INTERNAL a minute
        "p99LatencySeconds": 1,               # p99 497.5 ms
        "cpuThrottledSecondsPerSecond": 0.6,  # 0.5 s/s
    }
    url = "https://git.example.com/ml/splitserve/blob/main/docs/runbooks.md"
    values = {"prometheusRule": {"enabled": True, "thresholds": raised, "job": "other-job", "runbookUrl": url}}
    (tmp_path / "alerts.yaml").write_text(render_deploy.alert_rules_file(values), encoding="utf-8")
    proc = run_promtool("check", "rules", "alerts.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    silenced = set(THRESHOLDS) | {"SplitserveTargetDown"}
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            if case["alertname"] in silenced:
                case["exp_alerts"] = []
            for alert in case.get("exp_alerts", []):
                ann = alert["exp_annotations"]
                ann["runbook_url"] = ann["runbook_url"].replace("docs/runbooks.md", url)
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(tests), encoding="utf-8")
    proc = run_promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
    "splitserve_model_info",
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
        # Limits and connections.
        "splitserve_open_connections",
        "splitserve_connections_total",
        "splitserve_limit_rejections_total",
        "splitserve_auth_failures_total",
        # Models and payloads.
        "splitserve_model_info",
        "splitserve_request_bytes_sum",
        "splitserve_response_bytes_sum",
        # LLM decoding: KV sessions (docs/llm.md).
        "splitserve_kv_sessions",
        "splitserve_kv_cache_bytes",
        "splitserve_kv_session_events_total",
        "splitserve_kv_tokens_total",
    ):
        assert metric in exprs, metric
    for pool in ("process", "io", "inference", "intra_op", "inter_op"):
        assert re.search(rf'pool=~"[^"]*\b{pool}\b', exprs), pool
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(splitserve_queue_duration" in exprs


def test_no_percentiles_of_coarse_histograms(dashboard) -> None:
    """Batch sizes (buckets 1, 2, 4, ...) and payload sizes (powers of 4) are
    shown as exact means: a quantile interpolated inside such a bucket is not a
    value that ever happened (p50 0.5 requests per forward with batching off)."""
    for p in panels(dashboard):
        for t in p["targets"]:
            for metric in ("splitserve_batch_size", "splitserve_request_bytes", "splitserve_response_bytes"):
                assert not re.search(rf"histogram_quantile\([^)]*{metric}", t["expr"]), (p["title"], t["expr"])


def test_batch_size_panel_is_an_exact_mean(dashboard) -> None:
    (panel,) = [p for p in panels(dashboard) if p["title"] == "Batch size"]
    exprs = {t["refId"]: t["expr"] for t in panel["targets"]}
    assert re.fullmatch(
        r"sum by \(model\) \(rate\(splitserve_batch_size_sum\{[^}]*\}\[\$__rate_interval\]\)\)"
        r" / sum by \(model\) \(rate\(splitserve_batch_size_count\{[^}]*\}\[\$__rate_interval\]\)\)",
        exprs["A"],
    ), exprs["A"]
    assert 'le="1"' in exprs["B"] and exprs["B"].startswith("1 - "), exprs["B"]
    assert "stays at 1" not in panel["description"] and "exactly 1" in panel["description"]


def test_new_rows_are_laid_out(dashboard) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[-3:] == ["Limits and connections", "Models and payloads", "LLM decoding: KV sessions"]
    (models,) = [p for p in panels(dashboard) if p["title"] == "Models"]
    assert models["type"] == "table"
    (target,) = models["targets"]
    assert target["instant"] and target.get("format") == "table"
    # No two panels overlap.
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
        assert g["x"] + g["w"] <= 24, p["title"]


def test_time_per_token_panel_is_an_exact_mean(dashboard) -> None:
    """ms/token: the ratio of the decode seconds' and decode steps' rates, x 1000."""
    (panel,) = [p for p in panels(dashboard) if p["title"] == "Time per generated token"]
    (target,) = panel["targets"]
    assert re.fullmatch(
        r"1000 \* sum by \(pod\) \(rate\(splitserve_kv_decode_seconds_total\{[^}]*\}\[\$__rate_interval\]\)\)"
        r" / sum by \(pod\) \(rate\(splitserve_kv_decode_steps_total\{[^}]*\}\[\$__rate_interval\]\)\)",
        target["expr"],
    ), target["expr"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "ms"
    (events,) = [p for p in panels(dashboard) if p["title"] == "KV session events"]
    assert "sum by (event) (rate(splitserve_kv_session_events_total{" in events["targets"][0]["expr"]


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

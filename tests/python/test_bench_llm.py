"""`make bench-llm`'s verdicts (scripts/bench/llm.py), from recorded runs: the report
says which targets a run met and the exit status says whether all held. The
measurement itself takes minutes and runs alone (`make bench-llm`); these render
made-up runs with `--from-json`, which measures nothing."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "bench" / "llm.py"
PREFILL, CONTEXTS, WINDOW = 16, [32, 48], 4
CACHE_BYTES = 2 * 8 * 12 * 64 * 4  # a key and a value of one position, 8 layers


def sequence(ms, nbytes):
    """A recorded sequence whose decode step at context c took ms(c) and sent nbytes(c)."""
    contexts = list(range(PREFILL, max(CONTEXTS) + 1))
    cpu = [0.01 * (i + 1) for i in range(len(contexts))]
    return {
        "seed": 0, "prefill_ms": 50.0, "server_cpu_before_decode_s": 0.0,
        "steps": {"context": contexts, "ms": [ms(c) for c in contexts],
                  "request_bytes": [nbytes(c) // 2 for c in contexts],
                  "response_bytes": [nbytes(c) - nbytes(c) // 2 for c in contexts],
                  "server_cpu_s": cpu},
        "wall_s": 1.0, "server_cpu_s": cpu[-1], "client_cpu_s": 0.1, "other_cores": 0.0,
        "last_reply": {"cache_entries": 8, "cache_elements": 1, "key_shape": [1, 12, 49, 64]},
    }  # fmt: skip


def recorded_run(tmp_path, sessions=None, splitserve=None, python=None, diff=1e-6, quick=False):
    """A run's JSON: by default every target met."""
    runs = {
        "sessions": sessions or ((lambda c: 20.0), (lambda c: 6300)),
        "splitserve": splitserve or ((lambda c: 20.0 + 0.3 * c), (lambda c: CACHE_BYTES * c)),
        "python": python or ((lambda c: 26.0 + 3.0 * c), (lambda c: CACHE_BYTES * c)),
    }
    facts = dict(date="2026-01-01T00:00:00+00:00", nproc=2, cpu_count=2, cpu_model="cpu",
                 cgroup_cpu_max=None, kernel="6", python="3", torch="2", grpcio="1", numpy="2",
                 splitserve="splitserve 0.1.0", git_commit="abc", git_dirty=False, transformers="5")
    results = {
        "schema": 1, "complete": True, "quick": quick, "command": "llm.py", "raw_results": "x.json",
        "machine": facts, "duration_s": 10.0,
        "settings": {"trunk": "t", "prefill": PREFILL, "contexts": CONTEXTS, "window": WINDOW,
                     "repeats": 1, "warmup_steps": 1, "configs": list(runs)},
        "answers": {"0": {"sessions": diff, "splitserve": diff}},
        "sequences": {name: [sequence(*f)] for name, f in runs.items()},
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    return path


def render(tmp_path, path):
    report = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(path), "--markdown", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    targets = [line for line in report.read_text().splitlines() if line.startswith("| ") and "**" in line]
    return done.returncode, targets, report.read_text()


def verdicts(targets):
    return ["met" if line.endswith("| **met** |") else "missed" for line in targets]


def test_a_run_that_meets_every_target_passes_and_reports_the_ratios(tmp_path):
    rc, targets, report = render(tmp_path, recorded_run(tmp_path))
    assert rc == 0 and verdicts(targets) == ["met"] * 3, targets
    # Row 48 (the middle of 32, 48) is the steps at contexts 45..48: p50 at 46.5,
    # 20 ms with sessions against 26 + 3 * 46.5 = 165.5 ms; p99 near 48's; the
    # bytes of the step at 48.
    assert "20.00 vs 165.50 ms" in report
    assert f"| 48 | splitserve | 33.95 | 34.39 | 0.21x | 0.20x | {CACHE_BYTES * 48:,} | 1.00x |" in report
    assert "Answers agree" in report


@pytest.mark.parametrize("case,missed", [
    # The handle grows with the context: 6,300 + 1,000 bytes a position.
    ("sessions", dict(sessions=((lambda c: 20.0), (lambda c: 6300 + 1000 * c)))),
    # Sessions at context 48 only 165.5 / 40 = 4.1x faster than Python.
    ("speed", dict(sessions=((lambda c: 40.0), (lambda c: 6300)))),
    # Without sessions slower than Python at the largest context only.
    ("slower", dict(splitserve=((lambda c: 20.0 + (200.0 if c > 44 else 0.0)), (lambda c: CACHE_BYTES * c)))),
])  # fmt: skip
def test_a_missed_target_is_reported_and_fails_the_run(tmp_path, case, missed):
    rc, targets, _ = render(tmp_path, recorded_run(tmp_path, **missed))
    want = {"sessions": ["missed", "met", "met"], "speed": ["met", "missed", "met"],
            "slower": ["met", "met", "missed"]}[case]  # fmt: skip
    assert rc == 1 and verdicts(targets) == want, targets


def test_servers_that_answer_differently_fail_even_a_quick_run(tmp_path):
    rc, _, report = render(tmp_path, recorded_run(tmp_path, quick=True, diff=0.5))
    assert rc == 1 and "Answers **differ**" in report
    rc, _, _ = render(tmp_path, recorded_run(tmp_path, quick=True, sessions=((lambda c: 40.0), (lambda c: 6300))))
    assert rc == 0  # a quick run's contexts are not the targets'

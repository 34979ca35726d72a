"""benchmarks/bench_shapes_study.py (issue 34): budget checkpoints, resumable JSON-lines runs, Kendall tau."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_shapes_study", f"{ROOT}/benchmarks/bench_shapes_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_steps_and_tau_arithmetic(study):
    from scipy.stats import kendalltau

    assert study.budget_steps(1000) == [200, 500, 1000]
    assert study.budget_steps(300) == [200, 300] and study.budget_steps(4, [1, 2]) == [1, 2, 4]
    per_step = {
        200: {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.2},
        500: {"a": 0.4, "b": 0.5, "c": 0.1, "d": 0.2},
        1000: {"a": 0.9, "b": 0.6, "c": 0.7, "d": 0.8},
    }
    paper = {"a": 26.7, "b": 25.5, "c": 26.1, "d": 26.3}
    taus = study.budget_taus(per_step, paper)
    assert set(taus) == {"200->500", "500->1000", "200->1000", "paper@200", "paper@500", "paper@1000"}
    keys = sorted(paper)

    def ref(x, y):  # no ties: scipy's tau-b is the plain (tau-a) count koala reports
        return kendalltau([x[k] for k in keys], [y[k] for k in keys]).statistic

    for name, (x, y) in {
        "200->500": (per_step[200], per_step[500]),
        "500->1000": (per_step[500], per_step[1000]),
        "200->1000": (per_step[200], per_step[1000]),
        "paper@500": (paper, per_step[500]),
        "paper@1000": (paper, per_step[1000]),
    }.items():
        assert taus[name] == pytest.approx(ref(x, y)), name
    assert taus["paper@1000"] == 1.0  # same order as the paper
    assert study.kendall_tau({"a": 1, "b": 1}, {"a": 1, "b": 2}) == 0  # a tie counts 0


def test_tiny_study_run_scores_each_budget_once_and_resumes(study, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs.jsonl"
    argv = ["x", "run", "--tables", "7", "--seeds", "0", "--steps", "3", "--eval-at", "1", "2", "--batch-size", "2"]
    argv += [
        "--num-eval",
        "2",
        "--num-train",
        "6",
        "--no-reference",
        "--out",
        str(tmp_path / "o"),
        "--runs",
        str(runs),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    rows = [json.loads(line) for line in open(runs)]
    assert sorted((r["key"], r["step"]) for r in rows) == sorted(
        (study.method_key(spec), st) for spec in study.TABLES["7"].values() for st in (1, 2, 3)
    )
    study.main()  # resumed: everything is done, nothing is trained or appended
    assert len(open(runs).read().splitlines()) == len(rows)
    capsys.readouterr()
    out_json = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "report", str(runs), "--tables", "7", "--json", str(out_json)])
    study.main()
    notes = json.load(open(out_json))["tables"]["7"]
    means = {
        st: {
            name: sum(r["binding"] for r in rows if r["key"] == study.method_key(spec) and r["step"] == st)
            for name, spec in study.TABLES["7"].items()
        }
        for st in (1, 2, 3)
    }  # one seed: the mean is the row
    for a, b in (("1", "2"), ("2", "3"), ("1", "3")):
        assert notes["kendall_tau_binding"][f"{a}->{b}"] == study.kendall_tau(means[int(a)], means[int(b)])
    assert "spatial" in notes["methods"]["BK (LF all)"] and "kendall_tau_spatial" in notes

"""The compare flow for real: each arm a `dvc exp run -S ...` in a git + DVC
repository in a temp folder, a Prefect flow run on the temporary local server,
an MLflow parent run with children on SQLite; tiny fixture model and data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flowkit import copy_project, set_params

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, text_dir, eval_dir):
    root = tmp_path_factory.mktemp("compare-project")
    copy_project(root, tiny_model_dir, text_dir, eval_dir, extra=("compare",))
    set_params(
        root,
        calibration={"num_samples": 8, "holdout_samples": 0, "seq_len": 32},
        importance={"batch_size": 4},
        prune={"skip_first": 1, "skip_last": 1},
        evaluate={"batch_size": 4, "ppl_seq_len": 32, "resamples": 200},
        finetune={
            "batch_size": 2,
            "micro_batch_size": 2,
            "val_size": 2,
            "cutoff_len": 64,
        },
        bench={"prompt_len": 8, "context_len": 16, "warmup": 1, "threads": 1},
        compare={
            "methods": ["random", "shortgpt", "saap"],
            "ratios": [0.3],
            "seeds": [0, 1],
            "recover": ["saap"],
            "finetune_steps": 2,
            "limit": 4,
            "ppl_windows": 4,
            "fidelity_windows": 4,
            "bench_repeats": 2,
            "bench_decode_tokens": 4,
        },
    )
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)
    return root


def test_compare_runs_each_arm_as_a_dvc_experiment_and_gathers(project):
    from flows import tracking
    from flows.compare import compare

    params_before = (project / "params.yaml").read_bytes()
    summary = compare(project=str(project), run_id="t1", report_dir="report")

    # params.yaml is back as it was; every arm is a DVC experiment with its params
    assert (project / "params.yaml").read_bytes() == params_before
    import dvc.api

    experiments = {
        row["Experiment"]: row
        for row in dvc.api.exp_show(repo=str(project))
        if row.get("Experiment")
    }
    expected = {
        "cmp-t1-dense-00": "dense",
        "cmp-t1-random-30": "random",
        "cmp-t1-shortgpt-30": "shortgpt",
        "cmp-t1-saap-30": "saap",
    }
    for name, method in expected.items():
        assert experiments[name]["compare.method"] == method
        assert experiments[name]["method"] == method  # metrics/compare/arm.json

    rows = summary["rows"]
    by = {(r["method"], r["recovery"]): r for r in rows}
    assert set(by) == {
        ("dense", None),
        ("random", None),
        ("shortgpt", None),
        ("saap", None),
        ("saap", "group"),
        ("saap", "lora"),
    }
    dense = by[("dense", None)]
    for key, row in by.items():
        assert row["ppl"]["ptb"][0] > 1.0
        assert 0.0 <= row["mean_acc"][0] <= 1.0
        if key[0] != "dense":
            # about 30% of the parameters removed, from the same dense model
            assert 0.6 < row["params"] / dense["params"] < 0.75
            assert row["speedup_ideal"] > 1.2
    assert by[("saap", None)]["n_seeds"] == 2
    # the seed's importance pass time, kept beside its scores (run.json), not
    # in them: the report's calibration-pass column
    assert by[("saap", None)]["calibration_pass_s"] > 0
    for key, row in by.items():
        if key[0] != "dense":
            assert row["kl"][0] > 0.0  # fidelity to dense, per arm
            retention = row["retention"]
            assert retention["lower"] <= retention["value"] <= retention["upper"]
            assert row["vs_best"] in ("best", "not separated", "below best")
    assert by[("shortgpt", None)]["removed_layers"]  # whole layers gone

    report = (project / "report" / "results.md").read_text()
    assert "| 30% | SAAP | group |" in report
    assert (project / "report/figures/compare_accuracy_vs_params.png").stat().st_size
    assert (project / "report/figures/compare_kept_fraction.png").stat().st_size

    client = tracking.client_for(project)
    experiment = client.get_experiment_by_name("saap-compare")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_id == summary["mlflow_parent_run"]][0]
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert len(children) == 4
    saap = [c for c in children if c.data.params["method"] == "saap"][0]
    assert {"pruned.ppl.ptb", "group.ppl.ptb", "lora.mean_acc"} <= set(
        saap.data.metrics
    )

    # a rerun of the same comparison keeps what it gathered and adds no experiment
    report_text = report
    again = compare(project=str(project), run_id="t1", report_dir="report")
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in rows]
    assert (project / "report" / "results.md").read_text().split("|", 1)[
        1
    ] == report_text.split("|", 1)[1]

    # the report rendered again from the gathered arms runs nothing, logs nothing
    from saap.errors import DataError, ParamsError

    def experiment_names():
        return {
            row["Experiment"]
            for row in dvc.api.exp_show(repo=str(project))
            if row.get("Experiment")
        }

    runs_before = len(client.search_runs([experiment.experiment_id]))
    experiments_before = experiment_names()
    only = compare(
        project=str(project), run_id="t1", report_dir="report", report_only=True
    )
    assert only["mlflow_parent_run"] is None
    assert [r["ppl"] for r in only["rows"]] == [r["ppl"] for r in rows]
    assert len(client.search_runs([experiment.experiment_id])) == runs_before
    assert experiment_names() == experiments_before
    with pytest.raises(ParamsError, match="--run-id"):
        compare(project=str(project), report_dir="report", report_only=True)
    with pytest.raises(DataError, match="no gathered arm for dense @ 0.0"):
        compare(
            project=str(project), run_id="t9", report_dir="report", report_only=True
        )

    # an arm gathered under another code revision is re-run, not reused
    gathered = project / "artifacts/compare/runs/t1/random-0.3.json"
    stale = json.loads(gathered.read_text())
    revision = stale["revision"]
    gathered.write_text(json.dumps(stale | {"revision": "older-revision"}))
    compare(project=str(project), run_id="t1", report_dir="report")
    assert json.loads(gathered.read_text())["revision"] == revision


def test_failed_arm_fails_the_flow_and_restores_params(project):
    from flows.compare import compare
    from flows.compress import StageFailedError

    set_params(project, compare={"methods": ["saap"], "ratios": [0.99]})
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(StageFailedError, match="0.99"):
        compare(project=str(project), run_id="t2", report_dir="report")
    assert (project / "params.yaml").read_bytes() == before

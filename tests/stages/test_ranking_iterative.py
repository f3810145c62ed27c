"""The ranking stage's iterative pruning on the tiny fixture: where the plan
compensates, later steps score the compensated model (what the prune stage
builds), and the composed plan still meets the target."""

from __future__ import annotations

import json

import pytest
import yaml

import saap.iterative
import stages.ranking as ranking
from saap.params import PruneParams
from stages import calibration, importance

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tiny_model_dir, text_dir):
    root = tmp_path_factory.mktemp("ranking")
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "calibration": {"num_samples": 8, "holdout_samples": 2, "seq_len": 32},
                "importance": {
                    "batch_size": 2,
                    "estimators": ["taylor_element1", "wanda_sp"],
                },
            }
        )
    )
    calib, scores = root / "calibration", root / "importance"
    calibration.main(
        ["--params", str(params), "--model", str(tiny_model_dir), "--text",
         str(text_dir), "--out", str(calib)]
    )  # fmt: skip
    importance.main(
        ["--params", str(params), "--model", str(tiny_model_dir), "--calibration",
         str(calib), "--out", str(scores), "--report", str(root / "importance.json")]
    )  # fmt: skip
    return scores, calib


@pytest.mark.parametrize("least_squares", [True, False])
def test_iterative_steps_score_what_the_prune_stage_builds(
    stage_inputs, tiny_model_dir, monkeypatch, least_squares
):
    scores_dir, calib = stage_inputs
    built = []
    real = saap.iterative.prune_compensated

    def recording(model, plan, *args):
        built.append(plan.least_squares)
        return real(model, plan, *args)

    monkeypatch.setattr(saap.iterative, "prune_compensated", recording)
    params = PruneParams(
        ratio=0.2,
        skip_first=1,
        skip_last=1,
        saap_metrics=["taylor_element1", "wanda_sp"],
        iterations=2,
        least_squares=least_squares,
        least_squares_inputs="pruned",
        ridge_grid=[0.1, 1.0],
    )
    plan = ranking.run(params, tiny_model_dir, scores_dir, calib, batch_size=2)
    # one compensated model between the two steps, or the plain slice
    assert built == ([True] if least_squares else [])
    assert abs(plan.removed_params - plan.target_removed) <= 2 * 192
    assert bool(plan.least_squares) is least_squares


def test_importance_scores_are_byte_identical_and_run_facts_apart(
    stage_inputs, tiny_model_dir, tmp_path
):
    # the scores directory is a DVC output the ranking depends on: the same
    # inputs must give the same bytes (time and memory go to the report), or
    # every importance re-run would re-run the ranking
    scores_dir, calib = stage_inputs
    params = scores_dir.parent / "params.yaml"
    again, report = tmp_path / "importance", tmp_path / "importance.json"
    importance.main(
        ["--params", str(params), "--model", str(tiny_model_dir), "--calibration",
         str(calib), "--out", str(again), "--report", str(report)]
    )  # fmt: skip
    names = sorted(p.name for p in scores_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) == [
        "meta.json",
        "scores.safetensors",
    ]
    for name in names:
        assert (scores_dir / name).read_bytes() == (again / name).read_bytes(), name
    facts = json.loads(report.read_text())
    assert facts["seconds"] > 0 and facts["peak_rss_mb"] > 0
    # SAAP's fusion inputs (flap) are scored beside the ones params name
    assert facts["estimators"] == ["taylor_element1", "flap", "wanda_sp"]
    assert "seconds" not in json.loads((again / "meta.json").read_text())

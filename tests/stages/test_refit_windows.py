"""calibration.refit_samples: more windows for the least-squares refit only,
disjoint from the importance and held-back windows, which stay as they were;
the prune stage and the refit between iterative steps fit on both."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import saap.iterative
import stages.prune as prune_stage
import stages.ranking as ranking
from saap.calibration import fit_windows, load_calibration
from saap.data import sample_window_sets, sample_windows
from saap.errors import DataError
from saap.model import load_model
from saap.params import PruneParams
from saap.plan import load_plan
from saap.prune import prune_compensated
from stages import calibration, importance

pytestmark = pytest.mark.unit

REFIT = 6


def rows(tensor: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in tensor.tolist()}


def test_window_sets_extend_the_draw_without_changing_its_first_set():
    docs = [list(range(k * 1000, k * 1000 + 200)) for k in range(6)]
    alone, where = sample_windows(docs, 10, 16, seed=3)
    (first, first_where), (extra, extra_where) = sample_window_sets(
        docs, [10, 20], 16, seed=3
    )
    assert torch.equal(first, alone) and first_where == where
    assert extra.shape == (20, 16)
    assert not set(first_where) & set(extra_where)
    with pytest.raises(DataError, match=r"fewer than the 80 requested.*refit_samples"):
        sample_window_sets(docs, [10, 70], 16, seed=3)


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory, tiny_model_dir, text_dir):
    """The calibration stage without and with refit windows, and the importance
    stage on the windows they share."""
    root = tmp_path_factory.mktemp("refit")
    out = {}
    for refit in (0, REFIT):
        params = root / f"params{refit}.yaml"
        params.write_text(
            yaml.safe_dump(
                {
                    "calibration": {
                        "num_samples": 8,
                        "holdout_samples": 2,
                        "refit_samples": refit,
                        "seq_len": 32,
                    },
                    "importance": {
                        "batch_size": 2,
                        "estimators": ["taylor_element1", "flap"],
                    },
                }
            )
        )
        calibration.main(
            ["--params", str(params), "--model", str(tiny_model_dir), "--text",
             str(text_dir), "--out", str(root / f"calib{refit}")]
        )  # fmt: skip
        out[refit] = root / f"calib{refit}"
    importance.main(
        ["--params", str(root / "params0.yaml"), "--model", str(tiny_model_dir),
         "--calibration", str(out[0]), "--out", str(root / "importance"),
         "--report", str(root / "importance.json")]
    )  # fmt: skip
    out["importance"] = root / "importance"
    out["root"] = root
    return out


def test_refit_windows_are_extra_and_disjoint(calibrations):
    plain = load_file(str(calibrations[0] / "tokens.safetensors"))
    more = load_file(str(calibrations[REFIT] / "tokens.safetensors"))
    assert set(plain) == {"input_ids", "holdout_ids"}
    # importance and held-back windows do not depend on refit_samples
    assert torch.equal(plain["input_ids"], more["input_ids"])
    assert torch.equal(plain["holdout_ids"], more["holdout_ids"])
    assert more["refit_ids"].shape == (REFIT, 32)
    assert not rows(more["refit_ids"]) & rows(
        torch.cat([more["input_ids"], more["holdout_ids"]])
    )
    assert torch.equal(fit_windows(plain), plain["input_ids"])
    assert torch.equal(
        fit_windows(more), torch.cat([more["input_ids"], more["refit_ids"]])
    )
    # a default calibration keeps its record (and its DVC hash) as it was
    meta = (calibrations[0] / "meta.json").read_text()
    assert "refit" not in meta
    assert (
        f'"refit_samples": {REFIT}' in (calibrations[REFIT] / "meta.json").read_text()
    )


def prune_params(**overrides) -> PruneParams:
    settings = dict(
        ratio=0.25,
        skip_first=1,
        skip_last=1,
        saap_metrics=["taylor_element1", "flap"],
        least_squares=True,
        least_squares_inputs="pruned",
        ridge_grid=[0.1, 1.0],
    )
    return PruneParams(**(settings | overrides))


def test_prune_stage_refits_on_the_refit_windows_too(calibrations, tiny_model_dir):
    root = calibrations["root"]
    plan = ranking.run(
        prune_params(), tiny_model_dir, calibrations["importance"], calibrations[0]
    )
    plan_path = root / "plan.json"
    plan_path.write_text(plan.dumps())
    weights = {}
    for refit in (0, REFIT):
        out = root / f"pruned{refit}"
        prune_stage.run(
            tiny_model_dir,
            plan_path,
            calibrations["importance"],
            out,
            calibrations[refit],
        )
        weights[refit] = load_file(str(out / "model.safetensors"))
    # the same plan, refitted on 8 + 6 windows: what prune_compensated fits on
    # those windows, and not what it fits on the 8 alone
    model, _ = load_model(tiny_model_dir, dtype=torch.float32)
    tensors = load_calibration(calibrations[REFIT])
    expected = prune_compensated(
        model,
        load_plan(plan_path),
        fit_windows(tensors),
        holdout=tensors["holdout_ids"],
    ).state_dict()
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(weights[REFIT][down], expected[down], atol=1e-6)
    assert not torch.allclose(weights[0][down], weights[REFIT][down], atol=1e-4)


def test_refit_between_iterative_steps_fits_on_the_refit_windows(
    calibrations, tiny_model_dir, monkeypatch
):
    fitted, scored = [], []
    real_refit = saap.iterative.prune_compensated
    real_collect = saap.iterative.collect_for

    def refit(model, plan, windows, *args):
        fitted.append(len(windows))
        return real_refit(model, plan, windows, *args)

    def collect(model, windows, *args, **kwargs):
        scored.append(len(windows))
        return real_collect(model, windows, *args, **kwargs)

    monkeypatch.setattr(saap.iterative, "prune_compensated", refit)
    monkeypatch.setattr(saap.iterative, "collect_for", collect)
    ranking.run(
        prune_params(iterations=2),
        tiny_model_dir,
        calibrations["importance"],
        calibrations[REFIT],
        batch_size=2,
    )
    # the second step scores on the importance windows, the refit fits on more
    assert scored == [8]
    assert fitted == [8 + REFIT]

"""DVC stage ``ranking``: fuse scores, rank layers, allocate ratios, write plan.json.

Usage: ``python -m stages.ranking --model models/base --importance
artifacts/importance --calibration data/calibration --out artifacts/plan``
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

from saap.atomic import atomic_dir
from saap.calibration import fit_windows, load_calibration
from saap.errors import DataError
from saap.evaluation.perplexity import perplexity
from saap.iterative import stepped_plan
from saap.model import compute_dtype, count_params, layer_shapes, load_model
from saap.params import PruneParams, load_section
from saap.plan import Plan, plan_from_scores, plot_kept_fraction
from saap.prune import prune_model, record_compensation
from saap.scores import load_scores
from saap.sensitivity import measure_sensitivity
from stages.common import guarded, setup

log = logging.getLogger("stages.ranking")


def run(
    params: PruneParams,
    model_dir: Path,
    importance_dir: Path,
    calibration_dir: Path,
    batch_size: int = 4,
    per_window: str = "stored",
) -> Plan:
    model, _ = load_model(model_dir, dtype=torch.float32)
    scores = load_scores(importance_dir)
    holdout = None
    if params.ppl_bound is not None:
        windows = load_calibration(calibration_dir).get("holdout_ids")
        if windows is None:
            raise ValueError("prune.ppl_bound needs calibration.holdout_samples > 0")
        dtype = compute_dtype()

        def holdout(plan: Plan) -> float:
            return perplexity(prune_model(model, plan).to(dtype), windows)

    def measure(group_scores, layers: list[int]):
        windows = load_calibration(calibration_dir).get("holdout_ids")
        if windows is None:
            raise DataError(
                "prune.allocation 'sensitivity' needs held-back windows: set "
                "calibration.holdout_samples > 0"
            )
        dense = copy.deepcopy(model).to(compute_dtype())
        return measure_sensitivity(dense, group_scores, layers, windows)

    if params.steps > 1:
        # later steps re-score the pruned model on the calibration windows: the
        # compensated one where the plan compensates (what the prune stage will
        # build; benchmarks/saap_variants.py "refit between")
        calibration = load_calibration(calibration_dir)
        plan = stepped_plan(
            model,
            params,
            calibration["input_ids"],
            scores,
            batch_size,
            calibration.get("holdout_ids"),
            per_window=per_window,
            refit_windows=fit_windows(calibration),
        )
    else:
        plan = plan_from_scores(
            scores, layer_shapes(model), count_params(model), params, holdout, measure
        )
        record_compensation(plan, params)  # stepped_plan records its own
    plan.base_model = str(model_dir)
    return plan


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--importance", type=Path, default=Path("artifacts/importance"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/plan"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "prune")
    importance = load_section(args.params, "importance")
    plan = run(
        params,
        args.model,
        args.importance,
        args.calibration,
        importance.batch_size,
        importance.per_window,
    )
    with atomic_dir(args.out) as tmp:
        (tmp / "plan.json").write_text(plan.dumps())
        plot_kept_fraction(plan, tmp / "kept_fraction.png")
    log.info(
        "plan: %.2f%% of %d parameters removed",
        100 * plan.achieved_ratio,
        plan.total_params,
    )


if __name__ == "__main__":
    main()

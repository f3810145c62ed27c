"""DVC stage ``prune``: replay plan.json on the base model and save the smaller model.

Usage: ``python -m stages.prune --model models/base --plan artifacts/plan/plan.json
--importance artifacts/importance --out models/pruned``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from saap.atomic import atomic_dir
from saap.calibration import fit_windows, load_calibration
from saap.errors import DataError
from saap.model import count_params, load_model, save_checkpoint
from saap.plan import load_plan
from saap.prune import prune_compensated
from saap.scores import load_scores
from stages.common import guarded, setup

log = logging.getLogger("stages.prune")


def run(
    model_dir: Path,
    plan_path: Path,
    importance_dir: Path,
    out_dir: Path,
    calibration_dir: Path | None = None,
) -> dict:
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    plan = load_plan(plan_path)
    means = load_scores(importance_dir).input_means if plan.bias_compensation else None
    windows = holdout = None
    if plan.least_squares:
        if calibration_dir is None:
            raise DataError(
                "the plan asks for least-squares compensation, which needs the "
                "calibration windows: pass --calibration data/calibration"
            )
        tensors = load_calibration(calibration_dir)
        windows, holdout = fit_windows(tensors), tensors.get("holdout_ids")
    pruned = prune_compensated(model, plan, windows, means, holdout)
    summary = {
        "base_params": count_params(model),
        "pruned_params": count_params(pruned),
        "removed_ratio": 1 - count_params(pruned) / count_params(model),
        "importance": plan.importance,
        "allocation": plan.allocation,
        "bias_compensation": bool(plan.bias_compensation),
        "least_squares": bool(plan.least_squares),
        "least_squares_inputs": plan.least_squares_inputs,
        "ridge_grid": plan.ridge_grid,
    }
    with atomic_dir(out_dir) as tmp:
        save_checkpoint(pruned, tokenizer, tmp, extra=summary)
    return summary


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--plan", type=Path, default=Path("artifacts/plan/plan.json"))
    parser.add_argument("--importance", type=Path, default=Path("artifacts/importance"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--out", type=Path, default=Path("models/pruned"))
    args = parser.parse_args(argv)
    setup()
    summary = run(args.model, args.plan, args.importance, args.out, args.calibration)
    log.info(
        "pruned: %d -> %d parameters (%.2f%% removed)",
        summary["base_params"],
        summary["pruned_params"],
        100 * summary["removed_ratio"],
    )


if __name__ == "__main__":
    main()

"""DVC stage ``importance``: score every prunable group with every estimator.

Usage: ``python -m stages.importance --model models/base --calibration
data/calibration --out artifacts/importance --report metrics/importance.json``

The scores directory records what was scored (deterministic: the same inputs
give a byte-identical directory, so DVC sees unchanged scores as unchanged and
the ranking does not re-run); the run's time and memory go to the report.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path

import torch

from saap.atomic import atomic_dir, write_json
from saap.calibration import load_calibration
from saap.errors import ParamsError
from saap.importance.estimators import ESTIMATORS, collect_for, with_fusion_inputs
from saap.model import load_model
from saap.params import ImportanceParams, PruneParams, load_section
from saap.scores import ImportanceScores, save_scores, scores_from_stats
from stages.common import guarded, setup

log = logging.getLogger("stages.importance")


def compute(
    params: ImportanceParams, model_dir: Path, calibration_dir: Path
) -> tuple[ImportanceScores, dict]:
    """The scores, and the run's facts (``seconds``, ``peak_rss_mb``), kept
    apart: the scores' meta holds only what the inputs determine."""
    started = time.perf_counter()
    model, _ = load_model(model_dir, dtype=torch.float32)
    windows = load_calibration(calibration_dir)["input_ids"]
    # the Fisher diagonal if needed; the jackknife of every estimator that gives
    # it (SAAP may fuse any of them)
    stats = collect_for(
        model,
        windows,
        params.batch_size,
        list(params.estimators),
        per_window=params.per_window,
        jackknife=params.jackknife,
    )
    meta = {
        "num_layers": len(stats.layers),
        "estimators": list(params.estimators),
        "num_batches": stats.num_batches,
        "jackknife_windows": stats.num_samples,
        "per_window": params.per_window,
        "jackknife": params.jackknife,
        "num_tokens": stats.num_tokens,
        "calibration_losses": stats.losses,
    }
    scores = scores_from_stats(
        stats, list(params.estimators), params.seed, meta, params.jackknife
    )
    facts = {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }
    return scores, facts


def check_jackknife(params: ImportanceParams, prune: PruneParams) -> None:
    """Refuse, before any work, an ``importance.jackknife`` that names an
    estimator the stage does not compute, or leaves out a metric
    ``prune.saap_metrics`` fuses (the ranking could not fuse it)."""
    if params.jackknife is None:
        return
    computed = with_fusion_inputs(list(params.estimators))
    stray = [m for m in params.jackknife if m not in computed]
    if stray:
        raise ParamsError(
            f"importance.jackknife names {stray}, which importance.estimators "
            f"does not compute ({list(params.estimators)}); add them to "
            "importance.estimators or remove them from importance.jackknife"
        )
    if not ESTIMATORS[prune.importance].derived:
        return
    missing = [m for m in prune.saap_metrics if m not in params.jackknife]
    if missing:
        raise ParamsError(
            f"prune.saap_metrics fuses {missing} but importance.jackknife "
            f"{params.jackknife} does not compute their replicates; add them to "
            "importance.jackknife (or set it to null for every estimator)"
        )


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/importance"))
    parser.add_argument("--report", type=Path, default=Path("metrics/importance.json"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "importance")
    check_jackknife(params, load_section(args.params, "prune"))
    scores, facts = compute(params, args.model, args.calibration)
    with atomic_dir(args.out) as tmp:
        save_scores(scores, tmp)
    write_json(
        args.report,
        {"estimators": list(scores.scores), "num_tokens": scores.meta["num_tokens"]}
        | facts,
    )
    log.info("importance: %s in %.1f s", ", ".join(scores.scores), facts["seconds"])


if __name__ == "__main__":
    main()

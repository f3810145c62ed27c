"""Helpers of the real-model tests."""

from __future__ import annotations

from pathlib import Path


def prune_real(assets: Path, importance: str, allocation: str, ratio: float = 0.2):
    """(dense model, tokenizer, pruned model): SmolLM2-135M pruned by ``ratio`` of
    its parameters with one estimator, scored on 8 calibration windows."""
    from saap.calibration import make_calibration
    from saap.importance.estimators import collect_for
    from saap.model import count_params, layer_shapes, load_model
    from saap.params import CalibrationParams, PruneParams
    from saap.plan import plan_from_scores
    from saap.prune import prune_model
    from saap.scores import scores_from_stats

    model, tokenizer = load_model(assets / "models/base")
    tensors, _ = make_calibration(
        tokenizer,
        assets / "data/text",
        CalibrationParams(num_samples=8, holdout_samples=0),
    )
    stats = collect_for(model, tensors["input_ids"], 4, [importance])
    scores = scores_from_stats(stats, [importance], 0, {"num_layers": 30})
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        PruneParams(ratio=ratio, importance=importance, allocation=allocation),
    )
    return model, tokenizer, prune_model(model, plan)

"""Least-squares compensation against FLAP's bias, over the ridge and the number
of calibration tokens the refit sees.

SAAP plans (``prune.saap_metrics`` of params.yaml, adaptive allocation) at 20%
and 50% from one statistics pass on seed-0 calibration windows; every variant
prunes the same base model with the same plan, so only the compensation differs.
The refit's Gram matrices come from ``--fit-windows`` calibration windows (the
plan's own windows first, then further ones from the calibration corpus).
Perplexity on the evaluation windows (PTB, Wikipedia evaluation half; 128
tokens, bfloat16 where native). Usage::

    .venv/bin/python benchmarks/compensation_ridge.py [--fit-windows 32 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from saap.calibration import make_calibration
from saap.compensation import plan_grams
from saap.evaluation.perplexity import perplexity
from saap.evaluation.report import corpus_windows
from saap.importance.estimators import collect_for
from saap.methods import build_arm_plan
from saap.model import compute_dtype, count_params, layer_shapes, load_model
from saap.params import ImportanceParams, load_section
from saap.prune import prune_model
from saap.scores import scores_from_stats

RIDGES = (0.01, 0.1, 1.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--fit-windows", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench_compensation"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibration = load_section("params.yaml", "calibration")
    base_prune = load_section("params.yaml", "prune")
    batch_size = load_section("params.yaml", "importance").batch_size
    estimators = list(ImportanceParams().estimators)
    model, _ = load_model(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    shapes, total = layer_shapes(model), count_params(model)
    dtype = compute_dtype()
    corpora = {
        c: corpus_windows(tokenizer, args.text, c, 128, args.windows)
        for c in ("ptb", "wiki")
    }
    calib = calibration.model_copy(update={"seed": 0, "holdout_samples": 0})
    windows = make_calibration(tokenizer, args.text, calib)[0]["input_ids"]
    # more windows for the refit: the same corpus, the plan's windows first
    extra = calib.model_copy(update={"num_samples": max(args.fit_windows)})
    fit_pool = make_calibration(tokenizer, args.text, extra)[0]["input_ids"]
    fit_pool = torch.cat([windows, fit_pool])[: max(args.fit_windows)]
    stats = collect_for(model, windows, batch_size, estimators, progress=False)
    scores = scores_from_stats(stats, estimators, 0, {"num_layers": len(shapes)})
    rows = []
    for ratio in args.ratios:
        params = base_prune.model_copy(update={"ratio": ratio, "ppl_bound": None})
        plan = build_arm_plan(scores, shapes, total, params)
        variants = [("none", None, None, None), ("bias (FLAP)", None, True, None)]
        variants += [
            (f"least squares, ridge {r}, {n} windows", r, None, n)
            for n in args.fit_windows
            for r in RIDGES
        ]
        cached = {}  # Gram matrices per number of fit windows (same plan)
        for label, ridge, bias, fit in variants:
            started = time.perf_counter()
            means = scores.input_means if bias else None
            grams = None
            if ridge is not None:
                plan.ridge = ridge
                if fit not in cached:
                    cached[fit] = plan_grams(model, plan, fit_pool[:fit])
                grams = cached[fit]
            pruned = prune_model(model, plan, means, grams).to(dtype)
            row = {c: perplexity(pruned, w) for c, w in corpora.items()}
            row |= {"ratio": ratio, "variant": label}
            rows.append(row)
            print(row, f"{time.perf_counter() - started:.0f} s", flush=True)
            del pruned
    dense = {
        c: perplexity(copy.deepcopy(model).to(dtype), w) for c, w in corpora.items()
    }
    lines = [
        "# Least-squares compensation vs FLAP's bias",
        "",
        "Command: `.venv/bin/python benchmarks/compensation_ridge.py --fit-windows "
        f"{' '.join(map(str, args.fit_windows))}`; SAAP "
        f"({', '.join(base_prune.saap_metrics)}, {base_prune.allocation}) plans from "
        f"seed-0 calibration ({windows.shape[0]} x {windows.shape[1]} tokens), "
        f"{args.windows} evaluation windows x 128 tokens; dense PTB "
        f"{dense['ptb']:.1f}, Wiki {dense['wiki']:.1f}. One plan per ratio: only "
        "the compensation differs. One seed: differences of a few percent are "
        "within calibration noise (docs/bench_saap_variants.md).",
        "",
        "| ratio | compensation | PTB | Wiki |",
        "|---:|---|---:|---:|",
    ]
    lines += [
        f"| {r['ratio']:.0%} | {r['variant']} | {r['ptb']:.1f} | {r['wiki']:.1f} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "dense": dense}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

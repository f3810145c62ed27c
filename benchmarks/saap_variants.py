"""SAAP's parts, measured over calibration seeds: fused metrics, compensation,
allocation and runtime-aware widths against the baselines, at 20% and 50%.

Per seed, calibration windows are drawn with that seed and one statistics pass
(the importance stage's, jackknife included) scores every estimator; every
variant then prunes the same base model from those scores and is evaluated on the
same evaluation windows (PTB, Wikipedia evaluation half; 128 tokens, bfloat16
where native). Reported per variant: mean perplexity over seeds with a 95%
t-interval, and the paired difference of log perplexity to the reference variant
(LLM-Pruner element1, uniform) per seed, as a ratio with its 95% t-interval:
below 1 means better than the reference, "not separated" where the interval
contains 1. Usage::

    .venv/bin/python benchmarks/saap_variants.py [--seeds 0 1 2] [--ratios 0.2 0.5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from saap.calibration import fit_windows, make_calibration
from saap.comparison import seed_ratio, t95
from saap.evaluation.perplexity import fidelity, perplexity
from saap.evaluation.report import corpus_windows
from saap.fusion import jackknife_sigma
from saap.importance.estimators import collect_for
from saap.iterative import compensating_build, iterative_plan
from saap.methods import build_arm_plan
from saap.model import compute_dtype, count_params, layer_shapes, load_model
from saap.params import ImportanceParams, load_section
from saap.prune import prune_compensated, record_compensation
from saap.scores import scores_from_stats
from saap.sensitivity import measure_sensitivity

GRADIENT = ["taylor_vector", "taylor_element1"]
MIXED = ["taylor_element1", "wanda_sp"]
ALL4 = ["taylor_vector", "taylor_element1", "wanda_sp", "flap"]
EF = ["taylor_element1", "flap"]
# the default's scores: element1 and FLAP's fluctuation fused on the rank scale
RANK_EF: dict = dict(importance="saap_rank", saap_metrics=EF)
# every variant starts from the project's prune section with no compensation,
# one step and unrounded widths: a variant names what it adds (otherwise the
# baselines would inherit the pipeline's compensation from params.yaml)
NEUTRAL: dict = dict(
    bias_compensation=False,
    least_squares=False,
    least_squares_inputs="dense",
    ridge=1.0,
    ridge_grid=None,
    iterations=1,
    max_step_ratio=None,
    width_multiple=1,
)
# SAAP's default compensation, attention pruned, in two steps
TWO_STEPS: dict = dict(
    saap_metrics=MIXED,
    least_squares=True,
    least_squares_inputs="pruned",
    ridge_grid=[0.03, 0.1, 0.3, 1.0, 3.0],
    prune_attention=True,
    iterations=2,
)
# SAAP's default compensation: the sequential refit, ridge chosen per projection
SEQUENTIAL_LS: dict = dict(
    least_squares=True,
    least_squares_inputs="pruned",
    ridge_grid=[0.03, 0.1, 0.3, 1.0, 3.0],
)
# label -> prune overrides (on top of NEUTRAL)
VARIANTS: dict[str, dict] = {
    "LLM-Pruner element1, uniform (reference)": dict(
        importance="taylor_element1", allocation="uniform"
    ),
    "LLM-Pruner vector (per row), uniform": dict(
        importance="taylor_vector", allocation="uniform"
    ),
    "Wanda-sp, uniform": dict(importance="wanda_sp", allocation="uniform"),
    "FLAP, global, bias comp.": dict(
        importance="flap", allocation="global", bias_compensation=True
    ),
    # FLAP's scores and allocation with SAAP's default compensation
    "FLAP, global, + sequential least squares, ridge chosen": dict(
        importance="flap",
        allocation="global",
        least_squares=True,
        least_squares_inputs="pruned",
        ridge_grid=[0.03, 0.1, 0.3, 1.0, 3.0],
    ),
    "SAAP vector+element1, adaptive": dict(saap_metrics=GRADIENT),
    "SAAP element1+wanda_sp, adaptive": dict(saap_metrics=MIXED),
    "SAAP 4 metrics, adaptive": dict(saap_metrics=ALL4),
    "SAAP vector+element1, uniform": dict(saap_metrics=GRADIENT, allocation="uniform"),
    "SAAP vector+element1, + bias comp.": dict(
        saap_metrics=GRADIENT, bias_compensation=True
    ),
    "SAAP vector+element1, + least squares": dict(
        saap_metrics=GRADIENT, least_squares=True
    ),
    "SAAP element1+wanda_sp, + bias comp.": dict(
        saap_metrics=MIXED, bias_compensation=True
    ),
    "SAAP element1+wanda_sp, + least squares": dict(
        saap_metrics=MIXED, least_squares=True
    ),
    # each layer refitted on the pruned model's own hidden states, in layer order
    "SAAP element1+wanda_sp, + sequential least squares": dict(
        saap_metrics=MIXED, least_squares=True, least_squares_inputs="pruned"
    ),
    "SAAP element1+wanda_sp, + sequential least squares, ridge 0.1": dict(
        saap_metrics=MIXED, least_squares=True, least_squares_inputs="pruned", ridge=0.1
    ),
    # each projection's ridge chosen on the seed's held-back windows
    "SAAP element1+wanda_sp, + sequential least squares, ridge chosen": dict(
        saap_metrics=MIXED,
        least_squares=True,
        least_squares_inputs="pruned",
        ridge_grid=[0.03, 0.1, 0.3, 1.0, 3.0],
    ),
    "SAAP element1+wanda_sp, + sequential least squares to dense outputs": dict(
        saap_metrics=MIXED, least_squares=True, least_squares_inputs="pruned_to_dense"
    ),
    "SAAP vector+element1, widths x32": dict(saap_metrics=GRADIENT, width_multiple=32),
    # the default with every kept MLP width a whole number of llama.cpp's q8_0 /
    # q4_0 blocks (32 values)
    "SAAP element1+wanda_sp, + sequential least squares, ridge chosen, widths x32": (
        dict(saap_metrics=MIXED, width_multiple=32, **SEQUENTIAL_LS)
    ),
    # one shot against two steps with re-scoring (attention pruned in both)
    "SAAP element1+wanda_sp, + least squares, attention": dict(
        saap_metrics=MIXED, least_squares=True, prune_attention=True
    ),
    "SAAP element1+wanda_sp, + least squares, attention, 2 steps": dict(
        saap_metrics=MIXED, least_squares=True, prune_attention=True, iterations=2
    ),
    # the default's compensation with two steps: the second step scores the
    # plain slice of the first, or (REFIT_BETWEEN) its refitted model
    "SAAP element1+wanda_sp, + sequential least squares, ridge chosen, 2 steps": (
        TWO_STEPS
    ),
    "SAAP element1+wanda_sp, + sequential least squares, ridge chosen, 2 steps, "
    "refit between": TWO_STEPS,
    # the default's scores under FLAP's allocation, and FLAP's fluctuation fused
    # as a third metric: which part of FLAP + the same refit wins at 50%
    "SAAP element1+wanda_sp, global, + sequential least squares, ridge chosen": dict(
        saap_metrics=MIXED, allocation="global", **SEQUENTIAL_LS
    ),
    "SAAP element1+wanda_sp+flap, adaptive, + sequential least squares, ridge "
    "chosen": dict(saap_metrics=[*MIXED, "flap"], **SEQUENTIAL_LS),
    # ablation of the default, one part off at a time, the refit kept: uniform
    # allocation; one score instead of the fusion (the refit off is the row
    # "SAAP element1+wanda_sp, adaptive")
    "SAAP element1+wanda_sp, uniform, + sequential least squares, ridge chosen": dict(
        saap_metrics=MIXED, allocation="uniform", **SEQUENTIAL_LS
    ),
    "element1 only, adaptive, + sequential least squares, ridge chosen": dict(
        importance="taylor_element1", **SEQUENTIAL_LS
    ),
    "Wanda-sp only, adaptive, + sequential least squares, ridge chosen": dict(
        importance="wanda_sp", **SEQUENTIAL_LS
    ),
    "FLAP only, adaptive, + sequential least squares, ridge chosen": dict(
        importance="flap", **SEQUENTIAL_LS
    ),
    # the fusion on the rank scale (saap/fusion.py): a metric's weight from the
    # stability of its ranking, not of its mean-normalised values
    "SAAP rank element1+wanda_sp, adaptive, + sequential least squares, ridge "
    "chosen": dict(importance="saap_rank", saap_metrics=MIXED, **SEQUENTIAL_LS),
    "SAAP rank element1+wanda_sp+flap, adaptive, + sequential least squares, "
    "ridge chosen": dict(
        importance="saap_rank", saap_metrics=[*MIXED, "flap"], **SEQUENTIAL_LS
    ),
    "SAAP rank element1+flap, adaptive, + sequential least squares, ridge chosen": dict(
        **RANK_EF,
        **SEQUENTIAL_LS,
    ),
    "SAAP rank element1+wanda_sp+flap, global, + sequential least squares, "
    "ridge chosen": dict(
        importance="saap_rank",
        saap_metrics=[*MIXED, "flap"],
        allocation="global",
        **SEQUENTIAL_LS,
    ),
    # two steps with the refit between, MLP only (what 20% needs), and with the
    # rank-scale fusion of element1 and FLAP's fluctuation
    "SAAP element1+wanda_sp, + sequential least squares, ridge chosen, 2 steps, "
    "MLP only, refit between": TWO_STEPS | dict(prune_attention=False),
    "SAAP rank element1+flap, + sequential least squares, ridge chosen, 2 steps, "
    "refit between": TWO_STEPS | dict(RANK_EF),
    "SAAP rank element1+flap, + sequential least squares, ridge chosen, 2 steps, "
    "MLP only, refit between": TWO_STEPS
    | dict(
        **RANK_EF,
        prune_attention=False,
    ),
    # ablation of the 50% default (two steps, the refit between), one part off
    # at a time: uniform allocation; one score instead of the fusion; bias
    # compensation or none instead of the refit (the one-step row is "SAAP
    # element1+wanda_sp, + sequential least squares, ridge chosen")
    "SAAP element1+wanda_sp, uniform, + sequential least squares, ridge chosen, "
    "2 steps, refit between": TWO_STEPS | dict(allocation="uniform"),
    "element1 only, adaptive, + sequential least squares, ridge chosen, 2 steps, "
    "refit between": TWO_STEPS | dict(importance="taylor_element1"),
    "Wanda-sp only, adaptive, + sequential least squares, ridge chosen, 2 steps, "
    "refit between": TWO_STEPS | dict(importance="wanda_sp"),
    "SAAP element1+wanda_sp, + bias comp., 2 steps, refit between": TWO_STEPS
    | dict(least_squares=False, bias_compensation=True, ridge_grid=None),
    "SAAP element1+wanda_sp, no compensation, 2 steps": TWO_STEPS
    | dict(least_squares=False, ridge_grid=None),
    # measured on the seed's held-back windows (MLP only: not at 50%)
    "SAAP element1+wanda_sp, sensitivity": dict(
        saap_metrics=MIXED, allocation="sensitivity"
    ),
    # ablation of the rank-scale default (element1 + FLAP's fluctuation), one
    # part off at a time. 20% (one step): uniform allocation; the fusion on the
    # mean scale; one score alone ("element1 only" / "FLAP only, adaptive, +
    # sequential least squares, ridge chosen"); bias compensation or none
    # instead of the refit
    "SAAP rank element1+flap, uniform, + sequential least squares, ridge chosen": (
        dict(
            **RANK_EF,
            allocation="uniform",
            **SEQUENTIAL_LS,
        )
    ),
    "SAAP element1+flap, adaptive, + sequential least squares, ridge chosen": dict(
        importance="saap", saap_metrics=EF, **SEQUENTIAL_LS
    ),
    "SAAP rank element1+flap, adaptive, + bias comp.": dict(
        **RANK_EF,
        bias_compensation=True,
    ),
    "SAAP rank element1+flap, adaptive": dict(RANK_EF),
    # 50% (two steps, the refit between): the same parts off; one step is the
    # 20% default's row
    "SAAP rank element1+flap, uniform, + sequential least squares, ridge chosen, "
    "2 steps, refit between": TWO_STEPS
    | dict(
        **RANK_EF,
        allocation="uniform",
    ),
    "SAAP element1+flap, + sequential least squares, ridge chosen, 2 steps, refit "
    "between": TWO_STEPS | dict(importance="saap", saap_metrics=EF),
    "FLAP only, adaptive, + sequential least squares, ridge chosen, 2 steps, "
    "refit between": TWO_STEPS | dict(importance="flap"),
    "SAAP rank element1+flap, + bias comp., 2 steps, refit between": TWO_STEPS
    | dict(
        **RANK_EF,
        least_squares=False,
        bias_compensation=True,
        ridge_grid=None,
    ),
    "SAAP rank element1+flap, no compensation, 2 steps": TWO_STEPS
    | dict(
        **RANK_EF,
        least_squares=False,
        ridge_grid=None,
    ),
    # the rank-scale default with every kept MLP width a whole number of
    # llama.cpp's q8_0 / q4_0 blocks (32 values), at 20% and at 50%
    "SAAP rank element1+flap, adaptive, + sequential least squares, ridge chosen, "
    "widths x32": dict(**RANK_EF, width_multiple=32, **SEQUENTIAL_LS),
    "SAAP rank element1+flap, + sequential least squares, ridge chosen, 2 steps, "
    "refit between, widths x32": TWO_STEPS | dict(**RANK_EF, width_multiple=32),
}
# "SAAP ..." labels without "rank" are the fusion on the mean scale (importance
# saap), whatever params.yaml's prune.importance is
VARIANTS = {
    label: (
        {"importance": "saap"} | overrides
        if label.startswith("SAAP ") and not label.startswith("SAAP rank")
        else overrides
    )
    for label, overrides in VARIANTS.items()
}
REFERENCE = next(iter(VARIANTS))
# iterative variants whose later steps score the compensated model
REFIT_BETWEEN = {label for label in VARIANTS if label.endswith("refit between")}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (nan bounds for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t95(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def paired_table(results: dict, base: str) -> list[str]:
    """Every variant against ``base``, paired by seed (geometric mean of the
    per-seed ratios, 95% t-interval): below 1 is better than ``base``."""
    lines = [
        f"## Against '{base}', paired by seed",
        "",
        "Ratio variant / this one (geometric mean over seeds, 95% t-interval): "
        "below 1 is better; 'not separated' where the interval contains 1.",
        "",
        "| ratio | variant | PTB | Wiki | KL to dense |",
        "|---|---|---|---|---|",
    ]
    for ratio, variants in results.items():
        if base not in variants:
            raise SystemExit(f"--paired-to {base!r} did not run at ratio {ratio}")
        reference = variants[base]
        for label, rows in variants.items():
            if label == base:
                continue
            cells = []
            for metric in ("ptb", "wiki", "kl"):
                if not all(metric in r for r in rows + reference):
                    cells.append("-")
                    continue
                i = seed_ratio(
                    [r[metric] for r in rows], [r[metric] for r in reference]
                )
                separated = i.upper < 1 or i.lower > 1
                cells.append(
                    f"{i.value:.3f} [{i.lower:.3f}, {i.upper:.3f}]"
                    + ("" if separated else " not separated")
                )
            lines.append(f"| {ratio} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows")
    parser.add_argument(
        "--kl",
        action="store_true",
        help="also measure mean KL(dense || variant) on as many held-back C4 "
        "windows (the evaluation's fidelity metric)",
    )
    parser.add_argument("--samples", type=int, default=None, help="calibration windows")
    parser.add_argument(
        "--refit-samples",
        type=int,
        default=0,
        help="also run every least-squares variant with its refit fitted on this "
        "many more windows (calibration.refit_samples; the importance windows are "
        "the same either way), as a row of its own: '<label>, refit +N windows'",
    )
    parser.add_argument(
        "--base-refit-samples",
        type=int,
        default=0,
        help="windows added to every least-squares row's refit (the pipeline's "
        "default is params.yaml's calibration.refit_samples); --refit-samples "
        "rows add theirs instead",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only the variants whose label contains one of these (the "
        "reference always runs)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="--only names whole labels, not parts of them",
    )
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        help="score only these estimators in the statistics pass (default: the "
        "importance section's list); the variants run must use only these",
    )
    parser.add_argument(
        "--paired-to",
        default=None,
        help="also report every variant against this one (a whole label), paired "
        "by seed: PTB, Wikipedia and (with --kl) KL ratios (an ablation's table)",
    )
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench_saap_variants"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibration = load_section("params.yaml", "calibration")
    if args.samples:
        calibration = calibration.model_copy(update={"num_samples": args.samples})
    calibration = calibration.model_copy(
        update={"refit_samples": args.base_refit_samples}
    )
    base_prune = load_section("params.yaml", "prune")
    batch_size = load_section("params.yaml", "importance").batch_size
    estimators = args.estimators or list(ImportanceParams().estimators)
    model, _ = load_model(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    shapes, total = layer_shapes(model), count_params(model)
    dtype = compute_dtype()
    corpora = {
        c: corpus_windows(tokenizer, args.text, c, 128, args.windows)
        for c in ("ptb", "wiki")
    }
    dense = {
        c: perplexity(copy.deepcopy(model).to(dtype), w) for c, w in corpora.items()
    }
    print("dense", dense, flush=True)
    reference = copy.deepcopy(model).to(dtype) if args.kl else None
    kl_windows = (
        corpus_windows(tokenizer, args.text, "c4", 128, args.windows)
        if args.kl
        else None
    )
    results: dict[str, dict[str, list[dict]]] = {}
    seconds = {}
    sigmas = {}
    for seed in args.seeds:
        calib = calibration.model_copy(update={"seed": seed})
        tensors, _ = make_calibration(tokenizer, args.text, calib)
        windows, holdout = tensors["input_ids"], tensors.get("holdout_ids")
        base_fit = fit_windows(tensors)
        if args.refit_samples:
            more_calib = calib.model_copy(update={"refit_samples": args.refit_samples})
            more = fit_windows(make_calibration(tokenizer, args.text, more_calib)[0])

        def measure(group_scores, layers, holdout=holdout):
            dense = copy.deepcopy(model).to(dtype)
            return measure_sensitivity(dense, group_scores, layers, holdout)

        started = time.perf_counter()
        stats = collect_for(model, windows, batch_size, estimators, progress=False)
        scores = scores_from_stats(stats, estimators, seed, {"num_layers": len(shapes)})
        seconds[seed] = time.perf_counter() - started
        sigmas[seed] = {
            f"{kind}{suffix}": {
                m: jackknife_sigma(
                    torch.cat([r[kind] for r in scores.replicates[m]], 1), scale
                )
                for m in ALL4
                if m in scores.replicates
            }
            for scale, suffix in (("mean", ""), ("rank", ", rank"))
            for kind in ("mlp", "q_head")
        }
        print(
            f"seed {seed}: statistics {seconds[seed]:.0f} s", sigmas[seed], flush=True
        )
        for ratio in args.ratios:
            for label, overrides in VARIANTS.items():
                if args.only and label != REFERENCE:
                    if not any(
                        part == label if args.exact else part in label
                        for part in args.only
                    ):
                        continue
                if overrides.get("allocation") == "sensitivity" and ratio > 0.3:
                    continue  # needs attention pruning, which it does not do
                params = base_prune.model_copy(
                    update={"ratio": ratio, "ppl_bound": None, "seed": seed}
                    | NEUTRAL
                    | overrides
                )
                fits = {label: base_fit if params.least_squares else windows}
                if args.refit_samples and params.least_squares:
                    fits[f"{label}, refit +{args.refit_samples} windows"] = more
                for row_label, fit in fits.items():
                    if params.steps > 1:
                        build = None
                        if label in REFIT_BETWEEN:
                            build = compensating_build(
                                model, params, fit, scores.input_means, holdout
                            )
                        plan = iterative_plan(
                            model, windows, params, scores, batch_size, False, build
                        )
                        plan.prune_attention = params.prune_attention
                        record_compensation(plan, params)
                    else:
                        plan = build_arm_plan(scores, shapes, total, params, measure)
                    pruned = prune_compensated(
                        model, plan, fit, scores.input_means, holdout
                    ).to(dtype)
                    row = {c: perplexity(pruned, w) for c, w in corpora.items()}
                    if reference is not None:
                        with torch.no_grad():
                            kl, _ = fidelity(reference, pruned, kl_windows)
                        row["kl"] = float(kl.mean())
                    row |= {"seed": seed, "achieved_ratio": plan.achieved_ratio}
                    results.setdefault(f"{ratio}", {}).setdefault(row_label, []).append(
                        row
                    )
                    print(f"{ratio} {row_label} seed {seed}: {row}", flush=True)
                    del pruned
        # free this seed's statistics before the next seed's pass builds its own
        # (otherwise two seeds' live at once: the 128-window run hit 23.9 GB)
        del stats, scores
    write_report(args, results, dense, seconds, sigmas, windows.shape)


def write_report(args, results, dense, seconds, sigmas, calib_shape) -> None:
    lines = [
        "# SAAP's parts over calibration seeds",
        "",
        "Command: `.venv/bin/python benchmarks/saap_variants.py --seeds "
        f"{' '.join(map(str, args.seeds))} --ratios "
        f"{' '.join(map(str, args.ratios))}"
        + (f" --samples {args.samples}" if args.samples else "")
        + (f" --refit-samples {args.refit_samples}" if args.refit_samples else "")
        + (
            f" --base-refit-samples {args.base_refit_samples}"
            if args.base_refit_samples
            else ""
        )
        + (" --only " + " ".join(f"'{o}'" for o in args.only) if args.only else "")
        + (" --exact" if args.exact else "")
        + (" --kl" if args.kl else "")
        + (f" --paired-to '{args.paired_to}'" if args.paired_to else "")
        + (f" --windows {args.windows}" if args.windows != 64 else "")
        + (" --estimators " + " ".join(args.estimators) if args.estimators else "")
        + (f" --out {args.out}" if str(args.out) != "docs/bench_saap_variants" else "")
        + "`; calibration "
        f"{calib_shape[0]} x {calib_shape[1]} tokens per seed (C4), evaluation "
        f"{args.windows} windows x 128 tokens; dense PTB {dense['ptb']:.1f}, "
        f"Wiki {dense['wiki']:.1f}. Statistics pass (jackknife included) per seed: "
        + ", ".join(f"{s:.0f} s" for s in seconds.values())
        + ".",
        "",
        "Mean over seeds with 95% t-interval; 'vs reference' is the paired ratio of "
        "perplexities to the reference variant (geometric mean over seeds, 95% "
        "t-interval of the log ratio): below 1 is better; 'not separated' where the "
        "interval contains 1.",
        "",
    ]
    for ratio, table in results.items():
        lines += [
            f"## {float(ratio):.0%}",
            "",
            "| variant | PTB | 95% CI | seed sd (PTB) | vs reference (PTB) | Wiki "
            "| vs reference (Wiki) |",
            "|---|---:|---|---:|---|---:|---|",
        ]
        reference = table[REFERENCE]
        for label, rows in table.items():
            cells = [label]
            for corpus in ("ptb", "wiki"):
                mean, low, high = interval([r[corpus] for r in rows])
                logs = [
                    math.log(r[corpus] / ref[corpus])
                    for r, ref in zip(rows, reference, strict=True)
                ]
                d, dl, dh = interval(logs)
                verdict = (
                    "reference"
                    if label == REFERENCE
                    else f"{math.exp(d):.3f} [{math.exp(dl):.3f}, {math.exp(dh):.3f}]"
                    + ("" if dh < 0 or dl > 0 else " not separated")
                )
                if corpus == "ptb":
                    values = [r[corpus] for r in rows]
                    sd = statistics.stdev(values) if len(values) > 1 else math.nan
                    cells += [
                        f"{mean:.1f}",
                        f"[{low:.1f}, {high:.1f}]",
                        f"{sd:.1f}",
                        verdict,
                    ]
                else:
                    cells += [f"{mean:.1f}", verdict]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    kl_rows = [
        (ratio, label, [r["kl"] for r in rows])
        for ratio, variants in results.items()
        for label, rows in variants.items()
        if all("kl" in r for r in rows)
    ]
    if kl_rows:
        lines += [
            "## KL(dense || variant) per token, held-back C4 windows",
            "",
            "| ratio | variant | mean KL | 95% CI | per seed |",
            "|---|---|---:|---|---|",
        ]
        for ratio, label, values in kl_rows:
            mean, low, high = interval(values)
            per_seed = ", ".join(f"{v:.3f}" for v in values)
            lines.append(
                f"| {ratio} | {label} | {mean:.3f} | [{low:.3f}, {high:.3f}] | "
                f"{per_seed} |"
            )
        lines.append("")
    if args.paired_to:
        lines += paired_table(results, args.paired_to)
    lines += [
        "## Jackknife sigma per metric (mean-normalised scores; ', rank': ranks, "
        "per seed)",
        "",
        "| seed | kind | " + " | ".join(next(iter(sigmas.values()))["mlp"]) + " |",
        "|---|---|" + "---:|" * len(next(iter(sigmas.values()))["mlp"]),
    ]
    for seed, kinds in sigmas.items():
        for kind, values in kinds.items():
            lines.append(
                f"| {seed} | {kind} | "
                + " | ".join(f"{v:.3f}" for v in values.values())
                + " |"
            )
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "results": results,
                "dense": dense,
                "seconds": seconds,
                "sigmas": sigmas,
                "samples": calib_shape[0],
            },
            indent=1,
        )
    )
    print(text)


if __name__ == "__main__":
    main()

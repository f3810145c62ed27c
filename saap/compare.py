"""The side-by-side comparison: every method pruned from the same base model with
the same calibration windows, evaluated on the same subset, recovered with the
same fine-tuning budget.

Each *arm* is one method at one ratio: for every calibration seed the plan is
built from that seed's importance scores (one shared statistics pass per seed
computes every estimator), the model is pruned and evaluated; on the first seed
the pruned model is benchmarked and, for the methods in ``compare.recover``,
fine-tuned (LoRA for the baselines; group fine-tuning and LoRA for SAAP) and
evaluated again. The arms are run as separate DVC experiments by the compare
flow and gathered by :func:`gather` into rows, a Markdown table and plots.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saap.errors import PruningError, SaapError
from saap.evaluation.bench import benchmark_with
from saap.evaluation.intervals import paired_difference, paired_ratio
from saap.evaluation.report import evaluate_model
from saap.model import compute_dtype, count_params, layer_shapes, save_checkpoint
from saap.params import (
    BenchParams,
    CompareParams,
    EvaluateParams,
    EvaluationSettings,
    FinetuneParams,
    PruneParams,
)
from saap.plan import plan_from_scores
from saap.prune import prune_model

log = logging.getLogger(__name__)

SCHEMA = "saap.compare-arm/v2"


@dataclass(frozen=True)
class Method:
    """How one method scores and allocates (see docs/results.md)."""

    label: str
    importance: str
    allocation: str
    bias_compensation: bool = False


METHODS: dict[str, Method] = {
    "random": Method("Random", "random", "uniform"),
    "llm_pruner_vector": Method("LLM-Pruner vector", "taylor_vector", "uniform"),
    "llm_pruner_element1": Method("LLM-Pruner element1", "taylor_element1", "uniform"),
    "llm_pruner_element2": Method("LLM-Pruner element2", "taylor_element2", "uniform"),
    "flap": Method("FLAP", "flap", "global", bias_compensation=True),
    "wanda_sp": Method("Wanda-sp", "wanda_sp", "uniform"),
    # whole layers of lowest block influence; the remainder below one layer is
    # filled with MLP channels by taylor_element1 (so the budget is met exactly)
    "shortgpt": Method("ShortGPT", "taylor_element1", "layers"),
    "saap": Method("SAAP", "saap", "adaptive"),
    # SAAP with FLAP's bias compensation: the part that decides 50% (see
    # docs/results.md, benchmarks/ablate_allocation.py)
    "saap_bc": Method("SAAP + bias comp.", "saap", "adaptive", bias_compensation=True),
}


def recovery_methods(method: str, params: CompareParams) -> list[str]:
    """Fine-tuning methods run for ``method``: none, LoRA, or group + LoRA."""
    if method not in params.recover or method == "dense":
        return []
    return ["group", "lora"] if method == "saap" else ["lora"]


def prune_params_for(method: str, ratio: float, base: PruneParams) -> PruneParams:
    """The prune section of an arm: the project's structure settings (skipped
    layers, attention unit, spread) with the method's scores and allocation."""
    spec = METHODS[method]
    return base.model_copy(
        update={
            "ratio": ratio,
            "importance": spec.importance,
            "allocation": spec.allocation,
            "bias_compensation": spec.bias_compensation,
            "ppl_bound": None,
        }
    )


def build_arm_plan(scores, shapes, total: int, params: PruneParams) -> dict:
    """The plan; if MLP channels alone cannot remove ``ratio`` (50% of SmolLM2
    with its first and last layers kept), attention heads are pruned as well, the
    same rule for every method, recorded in the plan."""
    try:
        plan = plan_from_scores(scores, shapes, total, params)
    except PruningError:
        if params.prune_attention:
            raise
        params = params.model_copy(update={"prune_attention": True})
        plan = plan_from_scores(scores, shapes, total, params)
    plan["prune_attention"] = params.prune_attention
    plan["bias_compensation"] = params.bias_compensation
    return plan


def compare_evaluate_params(
    params: CompareParams, evaluate: EvaluateParams
) -> EvaluationSettings:
    """The evaluation settings (tasks, batch size, window length of the active
    profile) with the comparison's subset: ``compare.limit`` documents per task,
    PTB and wiki perplexity on ``compare.ppl_windows`` windows, fidelity to the
    dense model on ``compare.fidelity_windows`` windows, no generations."""
    return evaluate.resolved().model_copy(
        update={
            "limit": params.limit,
            "task_limits": {},
            "ppl_corpora": ["ptb", "wiki"],
            "ppl_max_windows": params.ppl_windows,
            "fidelity_windows": params.fidelity_windows,
            "prompts": [],
        }
    )


def evaluation_row(metrics: dict, documents: dict) -> dict:
    """The numbers of one evaluation a comparison row needs, with the
    per-document results of each task's reported metric (for paired intervals)."""
    zero_shot = metrics["zero_shot"]
    fidelity = metrics["fidelity"]
    return {
        "params": metrics["params"],
        "ppl": metrics["perplexity"],
        "acc": {t: s[s["metric"]] for t, s in zero_shot.items()},
        "metric": {t: s["metric"] for t, s in zero_shot.items()},
        "mean_acc": metrics["mean_acc"],
        "kl": fidelity["kl"] if fidelity else None,
        "top1": fidelity["top1_agreement"]["value"] if fidelity else None,
        "documents": {
            t: documents["zero_shot"][t][s["metric"]] for t, s in zero_shot.items()
        },
        "eval_config_hash": metrics["eval_config_hash"],
        "seconds": metrics["seconds"],
    }


def bench_row(model, tokenizer, params: CompareParams, bench: BenchParams) -> dict:
    """Edge metrics of a bf16 copy of ``model`` (saved to a temporary folder for
    its on-disk size)."""
    model = _copy(model).to(compute_dtype())
    with tempfile.TemporaryDirectory(prefix="saap-bench-") as tmp:
        save_checkpoint(model, tokenizer, Path(tmp))
        return benchmark_with(
            model,
            Path(tmp),
            bench,
            decode_tokens=params.bench_decode_tokens,
            repeats=params.bench_repeats,
        )


def run_arm(
    method: str,
    ratio: float,
    params: CompareParams,
    prune_base: PruneParams,
    finetune_base: FinetuneParams,
    evaluate_base: EvaluateParams,
    bench_base: BenchParams,
    base_model,
    tokenizer,
    importance_dirs: dict[int, Path],
    text_dir: Path,
    eval_dir: Path,
    records: list[dict] | None,
    plans_out: Path,
) -> dict:
    """Prune, evaluate, benchmark and recover one arm; return its JSON record.

    ``base_model`` is the float32 base; it is not modified.
    """
    from saap.finetune import merge, split_records, train_lora
    from saap.scores import load_scores

    eval_params = compare_evaluate_params(params, evaluate_base)
    started_arm = time.perf_counter()

    dtype = compute_dtype()
    reference = None if method == "dense" else _copy(base_model).to(dtype)

    def evaluate(model, variant: str) -> dict:
        model = _copy(model).to(dtype)  # the float32 model stays as it is
        metrics, documents = evaluate_model(
            model,
            tokenizer,
            text_dir,
            eval_dir,
            eval_params,
            variant,
            method,
            reference=reference,
        )
        return evaluation_row(metrics, documents)

    record: dict = {
        "schema": SCHEMA,
        "method": method,
        "label": "Dense" if method == "dense" else METHODS[method].label,
        "ratio": 0.0 if method == "dense" else ratio,
        "limit": params.limit,
        "ppl_windows": params.ppl_windows,
        "seeds": [],
        "recovered": [],
    }
    if method == "dense":
        row = evaluate(base_model, "dense")
        record["seeds"].append({"seed": None} | row)
        record["bench"] = bench_row(base_model, tokenizer, params, bench_base)
        record["seconds"] = time.perf_counter() - started_arm
        return record

    shapes = layer_shapes(base_model)
    total = count_params(base_model)
    prune_params = prune_params_for(method, ratio, prune_base)
    first_pruned = first_plan = None
    for seed in params.seeds:
        scores = load_scores(importance_dirs[seed])
        started = time.perf_counter()
        plan = build_arm_plan(
            scores, shapes, total, prune_params.model_copy(update={"seed": seed})
        )
        means = scores.input_means if plan["bias_compensation"] else None
        pruned = prune_model(base_model, plan, means)
        prune_s = time.perf_counter() - started
        plan["seed"] = seed
        (plans_out / f"plan-seed{seed}.json").write_text(_json(plan))
        row = evaluate(pruned, f"{method}@{ratio}:seed{seed}")
        row |= {
            "seed": seed,
            "achieved_ratio": plan["achieved_ratio"],
            "prune_attention": plan["prune_attention"],
            "removed_layers": plan["removed_layers"],
            "kept_fraction": kept_fractions(plan),
            "prune_s": prune_s,
            "calibration_pass_s": scores.meta.get("seconds"),
        }
        record["seeds"].append(row)
        log.info(
            "%s @ %.2f seed %d: ppl %s, mean acc %.4f",
            method,
            ratio,
            seed,
            {k: round(v, 2) for k, v in row["ppl"].items()},
            row["mean_acc"] or math.nan,
        )
        if first_pruned is None:
            first_pruned, first_plan = pruned, plan
    record["bench"] = bench_row(first_pruned, tokenizer, params, bench_base)

    for ft_method in recovery_methods(method, params):
        if records is None:
            raise SaapError("recovery needs the instruction data (data/instruct)")
        ft_params = finetune_base.model_copy(
            update={
                "method": ft_method,
                "max_steps": params.finetune_steps,
                "eval_steps": params.finetune_steps,
                "save_steps": params.finetune_steps,
                "warmup_steps": min(finetune_base.warmup_steps, params.finetune_steps),
            }
        )
        train, val = split_records(records, ft_params.val_size, ft_params.seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="saap-ft-") as resume:
            peft_model, result = train_lora(
                _copy(first_pruned),
                tokenizer,
                train,
                val,
                ft_params,
                Path(resume),
                first_plan,
            )
        merged = merge(peft_model)
        row = evaluate(merged, f"{method}@{ratio}+{ft_method}")
        row |= {
            "finetune": ft_method,
            "seed": params.seeds[0],
            "steps": result.steps,
            "tokens": result.tokens,
            "finetune_s": time.perf_counter() - started,
            "best_val_loss": result.val_losses.get(result.best_step),
        }
        record["recovered"].append(row)
        log.info(
            "%s @ %.2f + %s: ppl %s, mean acc %.4f",
            method,
            ratio,
            ft_method,
            {k: round(v, 2) for k, v in row["ppl"].items()},
            row["mean_acc"] or math.nan,
        )
    record["seconds"] = time.perf_counter() - started_arm
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def _copy(model):
    return copy.deepcopy(model)


def _json(value) -> str:
    return json.dumps(value, indent=1) + "\n"


def kept_fractions(plan: dict) -> list[float]:
    """Per layer, the fraction of its parameters kept (0 for a removed layer)."""
    return [1.0 - (1.0 if "removed" in e else e["ratio"]) for e in plan["layers"]]


# ---------------------------------------------------------------- gathering


def _mean_spread(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def summarise(records: list[dict], resamples: int = 2000) -> list[dict]:
    """One row per (method, ratio, recovery): means and spreads over seeds; the
    first seed's (or the recovered model's) zero-shot retention against dense
    with a paired bootstrap interval, and whether it is separated from the best
    row of its ratio (paired difference interval excluding 0)."""
    dense = next((r for r in records if r["method"] == "dense"), None)
    rows, row_docs = [], []
    for record in sorted(records, key=_order):
        seeds = record["seeds"]
        tasks = list(seeds[0]["acc"])
        kls = [s["kl"]["value"] for s in seeds if s.get("kl")]
        row = {
            "method": record["method"],
            "label": record["label"],
            "ratio": record["ratio"],
            "recovery": None,
            "n_seeds": len(seeds),
            "params": statistics.fmean(s["params"] for s in seeds),
            "ppl": {
                c: _mean_spread([s["ppl"][c] for s in seeds]) for c in seeds[0]["ppl"]
            },
            "acc": {t: _mean_spread([s["acc"][t] for s in seeds]) for t in tasks},
            "metric": seeds[0].get("metric", {}),
            "mean_acc": _mean_spread([s["mean_acc"] for s in seeds]),
            "kl": _mean_spread(kls) if kls else None,
            "prune_s": _mean_spread([s.get("prune_s", 0.0) for s in seeds]),
            "calibration_pass_s": seeds[0].get("calibration_pass_s"),
            "prune_attention": seeds[0].get("prune_attention"),
            "removed_layers": seeds[0].get("removed_layers", []),
            "kept_fraction": seeds[0].get("kept_fraction"),
        }
        bench = record.get("bench")
        if bench and dense and dense.get("bench"):
            row["decode_tokens_per_s"] = bench["decode_tokens_per_s"]
            row["speedup_measured"] = (
                bench["decode_tokens_per_s"] / dense["bench"]["decode_tokens_per_s"]
            )
            row["speedup_ideal"] = (
                dense["bench"]["weight_bytes_per_token"]
                / bench["weight_bytes_per_token"]
            )
        rows.append(row)
        row_docs.append(seeds[0].get("documents"))
        for recovered in record["recovered"]:
            rows.append(
                row
                | {
                    "recovery": recovered["finetune"],
                    "n_seeds": 1,
                    "params": recovered["params"],
                    "ppl": {c: (v, 0.0) for c, v in recovered["ppl"].items()},
                    "acc": {t: (v, 0.0) for t, v in recovered["acc"].items()},
                    "mean_acc": (recovered["mean_acc"], 0.0),
                    "kl": (recovered["kl"]["value"], 0.0)
                    if recovered.get("kl")
                    else None,
                    "finetune_s": recovered["finetune_s"],
                    "tokens": recovered["tokens"],
                }
            )
            row_docs.append(recovered.get("documents"))
    dense_docs = dense["seeds"][0].get("documents") if dense else None
    if dense_docs:
        _add_intervals(rows, row_docs, dense_docs, resamples)
    return rows


def _add_intervals(rows, row_docs, dense_docs, resamples: int) -> None:
    """Retention vs dense and separation from the best row of each ratio."""
    as_arrays = lambda docs: {t: np.asarray(v) for t, v in docs.items()}  # noqa: E731
    dense_arrays = as_arrays(dense_docs)
    for row, docs in zip(rows, row_docs, strict=True):
        if docs:
            row["retention"] = paired_ratio(
                as_arrays(docs), dense_arrays, resamples
            ).as_dict()
    for ratio in {r["ratio"] for r in rows if r["method"] != "dense"}:
        members = [
            i
            for i, r in enumerate(rows)
            if r["ratio"] == ratio and r["method"] != "dense" and row_docs[i]
        ]
        if not members:
            continue
        best = max(members, key=lambda i: rows[i]["mean_acc"][0])
        for i in members:
            if i == best:
                rows[i]["vs_best"] = "best"
                continue
            diff = paired_difference(
                as_arrays(row_docs[i]), as_arrays(row_docs[best]), resamples
            )
            rows[i]["vs_best"] = "below best" if diff.upper < 0 else "not separated"
            rows[i]["vs_best_difference"] = diff.as_dict()


def _order(record: dict) -> tuple:
    names = ["dense", *METHODS]
    return (record["ratio"], names.index(record["method"]))


def _pm(value: tuple[float, float], digits: int) -> str:
    mean, spread = value
    if spread == 0.0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def results_table(rows: list[dict]) -> str:
    tasks = list(rows[0]["acc"])
    short = {
        "boolq": "BoolQ",
        "piqa": "PIQA",
        "hellaswag": "HellaS",
        "winogrande": "WinoG",
        "arc_easy": "ARC-e",
        "arc_challenge": "ARC-c",
        "openbookqa": "OBQA",
    }
    head = (
        "| ratio | method | recovery | params (M) | PTB ppl | Wiki ppl | KL to dense | "
        + " | ".join(short.get(t, t) for t in tasks)
        + " | mean score | retention [95% CI] | vs best of ratio "
        "| decode speedup measured / ideal | prune s |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 12)]
    for row in rows:
        speed = (
            f"{row['speedup_measured']:.2f} / {row['speedup_ideal']:.2f}"
            if "speedup_measured" in row
            else "-"
        )
        prune_s = "-" if row["method"] == "dense" else f"{row['prune_s'][0]:.1f}"
        kl = _pm(row["kl"], 3) if row.get("kl") else "-"
        retention = row.get("retention")
        retention_text = (
            f"{retention['value']:.3f} [{retention['lower']:.3f}, "
            f"{retention['upper']:.3f}]"
            if retention and row["method"] != "dense"
            else "-"
        )
        lines.append(
            f"| {row['ratio']:.0%} | {row['label']} | {row['recovery'] or '-'} | "
            f"{row['params'] / 1e6:.1f} | {_pm(row['ppl']['ptb'], 1)} | "
            f"{_pm(row['ppl']['wiki'], 1)} | {kl} | "
            + " | ".join(_pm(row["acc"][t], 3) for t in tasks)
            + f" | {_pm(row['mean_acc'], 3)} | {retention_text} | "
            f"{row.get('vs_best', '-')} | {speed} | {prune_s} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {None: "o", "lora": "^", "group": "s"}
    colours = {}
    for row in rows:
        colour = colours.setdefault(row["label"], f"C{len(colours) % 10}")
        mean, spread = row["mean_acc"]
        ax.errorbar(
            row["params"] / 1e6,
            mean,
            yerr=spread or None,
            fmt=markers[row["recovery"]],
            color=colour,
            label=row["label"] if row["recovery"] is None else None,
            capsize=2,
        )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("mean zero-shot accuracy (7 tasks)")
    ax.set_title("o pruned (mean ± std over seeds), ^ + LoRA, s + group")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_kept_fraction_per_method(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(6 * len(ratios), 4), squeeze=False
    )
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for row in rows:
            if row["ratio"] != ratio or row["recovery"] or not row["kept_fraction"]:
                continue
            ax.plot(row["kept_fraction"], marker=".", label=row["label"])
        ax.set_title(f"{ratio:.0%} of parameters removed (first seed)")
        ax.set_xlabel("layer")
        ax.set_ylabel("kept fraction of the layer's parameters")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)

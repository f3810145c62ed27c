"""DVC stages of the comparison pipeline (``compare/dvc.yaml``).

``importance``: for every seed of ``compare.seeds``, calibration windows drawn with
that seed (the ``calibration`` section otherwise) and one statistics pass that
scores every estimator, saved under ``artifacts/compare/importance/seed<N>``.

``arm``: the arm ``compare.method`` at ``compare.ratio`` (pruned per seed,
evaluated, benchmarked, recovered), written to ``metrics/compare/arm.json`` and
its plans to ``artifacts/compare/arm``. The compare flow runs one DVC experiment
per arm and gathers them.

Usage: ``python -m stages.compare importance --params params.yaml``;
``python -m stages.compare arm --params params.yaml``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from saap.atomic import atomic_dir, write_json
from saap.calibration import fit_windows, load_calibration
from saap.errors import DataError, SaapError
from saap.evaluation.bench import benchmark_against, benchmark_with
from saap.evaluation.report import evaluate_model
from saap.evaluation.zeroshot import check_tasks
from saap.methods import (
    METHODS,
    arm_plan,
    kept_fractions,
    prune_params_for,
    recovery_methods,
)
from saap.model import (
    compute_dtype,
    load_model,
    save_checkpoint,
)
from saap.params import (
    BenchParams,
    CompareParams,
    EvaluateParams,
    EvaluationSettings,
    FinetuneParams,
    PruneParams,
    load_section,
)
from saap.prune import prune_compensated
from stages.common import guarded, setup

log = logging.getLogger("stages.compare")

SCHEMA = "saap.compare-arm/v2"
# a seed's importance run facts (seconds, peak_rss_mb), beside its scores
RUN_FACTS = "run.json"

ESTIMATORS = sorted(
    {m.importance for m in METHODS.values()} - {"saap"}
    | {"taylor_vector", "taylor_element1", "taylor_element2"}
)


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
            "ppl_windows": {},  # compare.ppl_windows caps both corpora
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


def bench_row(
    model, tokenizer, params: CompareParams, bench: BenchParams, dense=None
) -> dict:
    """Edge metrics of a bf16 copy of ``model`` (saved to a temporary folder for
    its on-disk size); with ``dense`` (bf16), timed interleaved with it in this
    process, so ``speedup_vs_dense`` carries a paired interval over the rounds."""
    model = _copy(model).to(compute_dtype())
    settings = bench.model_copy(
        update={
            "decode_tokens": params.bench_decode_tokens,
            "repeats": params.bench_repeats,
        }
    )
    with tempfile.TemporaryDirectory(prefix="saap-bench-") as tmp:
        save_checkpoint(model, tokenizer, Path(tmp))
        if dense is not None:
            return benchmark_against(model, Path(tmp), dense, settings)
        return benchmark_with(model, Path(tmp), settings)


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
    batch_size: int = 4,
    per_window: str = "stored",
    teacher_text_dir: Path | None = None,
) -> dict:
    """Prune, evaluate, benchmark and recover one arm; return its JSON record.

    ``base_model`` is the float32 base; it is not modified. ``batch_size``:
    calibration windows per backward where a method prunes in steps (the later
    steps re-score the pruned model); ``per_window`` as importance.per_window.
    """
    from saap.finetune import merge, split_records
    from saap.recovery import RecoveryData, recover
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

    prune_params = prune_params_for(method, ratio, prune_base)
    first_pruned = first_plan = None
    for seed in params.seeds:
        scores = load_scores(importance_dirs[seed])
        started = time.perf_counter()
        seed_params = prune_params.model_copy(update={"seed": seed})
        windows = holdout = fit = None
        if seed_params.least_squares or seed_params.steps > 1:
            # the seed's calibration windows are saved beside its scores
            tensors = load_calibration(importance_dirs[seed])
            windows, holdout = tensors["input_ids"], tensors.get("holdout_ids")
            fit = fit_windows(tensors)
        plan = arm_plan(
            base_model,
            seed_params,
            scores,
            windows,
            holdout,
            batch_size,
            per_window=per_window,
            refit_windows=fit,
        )
        pruned = prune_compensated(base_model, plan, fit, scores.input_means, holdout)
        prune_s = time.perf_counter() - started
        plan.seed = seed
        (plans_out / f"plan-seed{seed}.json").write_text(plan.dumps())
        row = evaluate(pruned, f"{method}@{ratio}:seed{seed}")
        row |= {
            "seed": seed,
            "achieved_ratio": plan.achieved_ratio,
            "prune_attention": plan.prune_attention,
            "removed_layers": plan.removed_layers,
            "kept_fraction": kept_fractions(plan),
            "prune_s": prune_s,
            "calibration_pass_s": calibration_pass_s(importance_dirs[seed]),
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
    record["bench"] = bench_row(
        first_pruned, tokenizer, params, bench_base, dense=reference
    )

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
            trained, result = recover(
                _copy(first_pruned),
                tokenizer,
                RecoveryData(
                    train,
                    val,
                    text_dir=text_dir,
                    eval_dir=eval_dir,
                    teacher=lambda: _copy(base_model).to(dtype),
                    teacher_text_dir=teacher_text_dir,
                ),
                ft_params,
                Path(resume),
                first_plan,
            )
        merged = merge(trained)
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


def calibration_pass_s(seed_dir: Path) -> float | None:
    """The seconds the seed's importance pass took (None for scores written
    before the run facts were kept apart)."""
    path = Path(seed_dir) / RUN_FACTS
    if path.is_file():
        return json.loads(path.read_text()).get("seconds")
    return None


def _copy(model):
    return copy.deepcopy(model)


def importance(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from saap.calibration import make_calibration, save_calibration
    from saap.params import ImportanceParams
    from saap.scores import save_scores
    from stages.importance import compute

    compare = load_section(args.params, "compare")
    calibration = load_section(args.params, "calibration")
    base_importance = load_section(args.params, "importance")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = ImportanceParams(
        estimators=ESTIMATORS,
        batch_size=base_importance.batch_size,
        per_window=base_importance.per_window,
    )
    with atomic_dir(args.out) as tmp:
        for seed in compare.seeds:
            # held-back windows kept: a ridge_grid refit chooses on them
            calib = calibration.model_copy(update={"seed": seed})
            tensors, meta = make_calibration(tokenizer, args.text, calib)
            seed_dir = tmp / f"seed{seed}"
            seed_dir.mkdir()
            save_calibration(tensors, meta, seed_dir)
            scores, facts = compute(
                params.model_copy(update={"seed": seed}), args.model, seed_dir
            )
            save_scores(scores, seed_dir)
            # the run's time beside the scores (the arms report it)
            write_json(seed_dir / RUN_FACTS, facts)
            log.info("seed %d: importance in %.1f s", seed, facts["seconds"])


def arm(args: argparse.Namespace) -> None:
    from stages.finetune import read_records

    compare = load_section(args.params, "compare")
    prune = load_section(args.params, "prune")
    finetune = load_section(args.params, "finetune")
    evaluate = load_section(args.params, "evaluate")
    bench = load_section(args.params, "bench")
    importance_params = load_section(args.params, "importance")
    check_tasks(list(evaluate.tasks))
    missing = [s for s in compare.seeds if not (args.importance / f"seed{s}").is_dir()]
    if missing and compare.method != "dense":
        raise DataError(
            f"{args.importance} has no scores for seed(s) {missing}; run "
            "`dvc repro compare/dvc.yaml:importance`"
        )
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    records = read_records(args.data) if compare.method in compare.recover else None
    with atomic_dir(args.plans) as plans:
        record = run_arm(
            compare.method,
            compare.ratio,
            compare,
            prune,
            finetune,
            evaluate,
            bench,
            model,
            tokenizer,
            {s: args.importance / f"seed{s}" for s in compare.seeds},
            args.text,
            args.eval,
            records,
            plans,
            importance_params.batch_size,
            importance_params.per_window,
            args.teacher_text,
        )
    write_json(args.out, record)
    log.info(
        "arm %s @ %.2f done in %.0f s", compare.method, compare.ratio, record["seconds"]
    )


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("importance")
    imp.add_argument("--params", default="params.yaml")
    imp.add_argument("--model", type=Path, default=Path("models/base"))
    imp.add_argument("--text", type=Path, default=Path("data/text"))
    imp.add_argument("--out", type=Path, default=Path("artifacts/compare/importance"))
    one = sub.add_parser("arm")
    one.add_argument("--params", default="params.yaml")
    one.add_argument("--model", type=Path, default=Path("models/base"))
    one.add_argument(
        "--importance", type=Path, default=Path("artifacts/compare/importance")
    )
    one.add_argument("--text", type=Path, default=Path("data/text"))
    one.add_argument("--eval", type=Path, default=Path("data/eval"))
    one.add_argument(
        "--teacher-text",
        type=Path,
        default=Path("data/teacher_text"),
        help="the dense model's samples (finetune.kd_corpora: teacher)",
    )
    one.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    one.add_argument("--plans", type=Path, default=Path("artifacts/compare/arm"))
    one.add_argument("--out", type=Path, default=Path("metrics/compare/arm.json"))
    args = parser.parse_args(argv)
    setup()
    {"importance": importance, "arm": arm}[args.command](args)


if __name__ == "__main__":
    main()

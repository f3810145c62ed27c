"""Recovery at matched token budgets: SmolLM2-135M pruned by SAAP, recovered by
LoRA (LLM-Pruner), SAAP group fine-tuning and distillation from the dense model
(kd), each given the same number of training tokens.

An arm is a recovery method with optional overrides of finetune parameters,
``name:key=value+key=value`` (e.g. ``kd:kd_topk=64`` or
``kd:kd_topk=64+learning_rate=2e-4``); arms are separated by commas.
Per arm: PTB and Wikipedia perplexity (and its paired ratio to plain ``kd`` at
the same budget, on the same windows), KL to the dense model and top-1 agreement
(held-back windows, with intervals), zero-shot mean score (acc_norm where the task
defines it) on ``--limit`` documents per task with its paired retention interval
against dense, training tokens, tokens/s and wall time. LoRA's steps are set from
the mean tokenized length of the instruction records so its budget matches.

Usage (after ``dvc repro ranking``; minutes per arm on 2 cores)::

    .venv/bin/python benchmarks/recovery_smollm2.py --ratios 0.2 \\
        --budgets 50000 --methods lora,group,kd,kd:kd_topk=64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from saap.calibration import fit_windows, load_calibration
from saap.evaluation.intervals import paired_ratio, perplexity_ratio
from saap.evaluation.report import evaluate_model
from saap.finetune import merge, split_records, tokenize_records
from saap.methods import arm_plan, prune_params_for, pruning_label
from saap.model import compute_dtype, count_params, load_model
from saap.params import FinetuneParams, load_section
from saap.prune import prune_compensated
from saap.recovery import RECOVERIES, RecoveryData, recover
from saap.scores import load_scores
from stages.finetune import read_records


def evaluation(params, limit, windows, fidelity_windows):
    """The evaluate profile's settings with this benchmark's subset: ``windows``
    perplexity windows per corpus except where the profile's ``ppl_windows``
    names the corpus (the quick profile: all of PTB test)."""
    return (
        load_section(params, "evaluate")
        .resolved()
        .model_copy(
            update={
                "limit": limit or None,
                "task_limits": {},
                "tasks": load_section(params, "evaluate").tasks if limit else [],
                "ppl_corpora": ["ptb", "wiki"],
                "ppl_max_windows": windows,
                "fidelity_windows": fidelity_windows,
                "prompts": [],
            }
        )
    )


def windows_text(args) -> str:
    """How many perplexity windows each corpus had: ``--windows``, unless the
    evaluate profile's ``ppl_windows`` sets a corpus (the quick profile reads
    PTB whole)."""
    settings = evaluation(args.params, args.limit, args.windows, args.fidelity_windows)
    parts = []
    for corpus in settings.ppl_corpora:
        cap = settings.windows_of(corpus)
        parts.append(f"{corpus} {'all windows' if cap is None else cap}")
    return "windows per corpus: " + ", ".join(parts)


def split_arms(text: str) -> list[str]:
    """``kd,kd:kd_corpora=[c4,wiki,mmlu]`` -> the two arms: commas inside
    brackets belong to a list value."""
    arms, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            arms.append(current)
            current = ""
        else:
            current += char
    return [arm for arm in (*arms, current) if arm]


def parse_arm(token: str) -> tuple[str, dict]:
    """``kd:kd_topk=64+learning_rate=2e-4`` -> ("kd", {"kd_topk": 64, ...})."""
    name, _, rest = token.partition(":")
    overrides = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    # validated and typed as params.yaml would be (model_copy does not validate)
    parsed = FinetuneParams.model_validate(overrides)
    return name, {key: getattr(parsed, key) for key in overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--importance", type=Path, default=Path("artifacts/importance"))
    parser.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument(
        "--teacher-text",
        type=Path,
        default=Path("data/teacher_text"),
        help="the dense model's samples (kd_corpora: teacher; stage teacher-text)",
    )
    parser.add_argument(
        "--prune-method",
        default="saap_ls",
        help="comparison method (saap/methods.py) that prunes; saap_ls is the "
        "pipeline's default (SAAP with the least-squares refit)",
    )
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--budgets", default="50000")
    parser.add_argument("--methods", default="lora,group,kd")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--fidelity-windows", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="docs per task; 0: none")
    parser.add_argument(
        "--teacher-cache",
        type=Path,
        default=None,
        help="kd_topk targets cache; default: a fresh folder per invocation, so "
        "the first top-k arm computes them and later ones read them",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench_recovery.md"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the JSON of earlier invocations",
    )
    args = parser.parse_args()
    results_path = args.out.with_suffix(".json")
    context_path = args.out.with_suffix(".dense.json")
    if args.report_only:
        context = json.loads(context_path.read_text())
        write_report(
            args,
            json.loads(results_path.read_text()),
            context["dense"],
            context["lora_tokens_per_example"],
        )
        return
    torch.set_num_threads(2)
    dtype = compute_dtype()
    base, tokenizer = load_model(args.model, dtype=torch.float32)
    teacher = copy.deepcopy(base).to(dtype)
    scores = load_scores(args.importance)
    tensors = load_calibration(args.calibration)
    calibration, holdout = tensors["input_ids"], tensors.get("holdout_ids")
    fit = fit_windows(tensors)
    batch_size = load_section(args.params, "importance").batch_size
    records = read_records(args.data)
    finetune = load_section(args.params, "finetune")
    train, val = split_records(records, finetune.val_size, finetune.seed)
    examples, _ = tokenize_records(
        tokenizer, train, finetune.cutoff_len, finetune.train_on_inputs
    )
    lora_tokens_per_example = sum(len(e.input_ids) for e in examples) / len(examples)
    settings = evaluation(args.params, args.limit, args.windows, args.fidelity_windows)
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {
        (r.get("pruning", "saap"), r["ratio"], r["method"], r["budget"])
        for r in results
    }

    def evaluate(model, label: str) -> tuple[dict, dict]:
        return evaluate_model(
            copy.deepcopy(model).to(dtype),
            tokenizer,
            args.text,
            args.eval,
            settings,
            label,
            label,
            reference=teacher,
        )

    teacher_cache = args.teacher_cache or Path(tempfile.mkdtemp(prefix="teacher-"))
    dense_metrics, dense_docs = evaluate(base, "dense")
    # per-window PTB NLL too: the PTB / dense column pairs the same windows
    dense_record = {
        "perplexity": dense_metrics["perplexity"],
        "ptb_nll": dense_docs["perplexity"]["ptb"],
    }
    context_path.write_text(
        json.dumps(
            {
                "dense": dense_record,
                "lora_tokens_per_example": lora_tokens_per_example,
            }
        )
        + "\n"
    )
    for ratio in [float(r) for r in args.ratios.split(",")]:
        params = prune_params_for(
            args.prune_method, ratio, load_section(args.params, "prune")
        )
        # in steps where the method's params ask for them (SAAP at 50%: two)
        plan = arm_plan(
            base, params, scores, calibration, holdout, batch_size, refit_windows=fit
        )
        label = pruning_label(args.prune_method, params)
        # the compensation the plan asks for, as the prune stage applies it
        pruned = prune_compensated(base, plan, fit, scores.input_means, holdout)
        arms = [("none", 0)] + [
            (m, int(b))
            for b in args.budgets.split(",")
            for m in split_arms(args.methods)
        ]
        for method, budget in arms:
            if (label, ratio, method, budget) in done:
                continue
            started = time.perf_counter()
            result = None
            in_domain: list[str] = []
            model = pruned
            if method != "none":
                name, overrides = parse_arm(method)
                # the arm's own batch and window length where it overrides them
                arm = finetune.model_copy(update=overrides)
                per_step = arm.batch_size * (
                    arm.cutoff_len
                    if name in ("kd", "group")
                    else lora_tokens_per_example
                )
                steps = max(1, math.ceil(budget / per_step))
                ft = arm.model_copy(
                    update={
                        "method": name,
                        "max_steps": steps,
                        "eval_steps": steps,
                        "save_steps": steps,
                        "warmup_steps": min(finetune.warmup_steps, steps),
                        "learning_rate": overrides.get("learning_rate"),
                    }
                )
                data = RecoveryData(
                    train,
                    val,
                    text_dir=args.text,
                    eval_dir=args.eval,
                    teacher=teacher,
                    cache_dir=teacher_cache,
                    teacher_text_dir=args.teacher_text,
                )
                with tempfile.TemporaryDirectory() as resume:
                    trained, result = recover(
                        copy.deepcopy(pruned),
                        tokenizer,
                        data,
                        ft,
                        Path(resume),
                        plan,
                        progress=False,
                    )
                model = merge(trained)
                in_domain = RECOVERIES.get(name).in_domain(ft)
            wall = time.perf_counter() - started
            metrics, docs = evaluate(model, f"{method}@{ratio}")
            row = {
                "pruning": label,
                "ratio": ratio,
                "method": method,
                "budget": budget,
                "params": count_params(model),
                "ppl": metrics["perplexity"],
                "kl": metrics["fidelity"]["kl"],
                "top1": metrics["fidelity"]["top1_agreement"],
                "ptb_nll": docs["perplexity"]["ptb"],
                "mean_acc": metrics.get("mean_acc"),
                "tokens": result.tokens if result else 0,
                "tokens_per_s": result.tokens_per_s if result else None,
                "train_s": result.seconds if result else 0.0,
                "wall_s": wall,
            }
            if in_domain:
                row["in_domain"] = in_domain
            if args.limit:
                row["retention"] = paired_ratio_of(docs, dense_docs, metrics)
            results.append(row)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    write_report(args, results, dense_record, lora_tokens_per_example)


def paired_ratio_of(docs: dict, dense_docs: dict, metrics: dict) -> dict:
    """Retention of the mean score against dense, paired over the documents."""
    tasks = sorted(metrics["zero_shot"])
    pick = {t: metrics["zero_shot"][t]["metric"] for t in tasks}
    candidate = {t: np.asarray(docs["zero_shot"][t][pick[t]]) for t in tasks}
    dense = {t: np.asarray(dense_docs["zero_shot"][t][pick[t]]) for t in tasks}
    return paired_ratio(candidate, dense, 2000).as_dict()


def in_domain_mark(row: dict) -> str:
    """PTB distilled on its own train split is in-domain: marked in the table."""
    return " (in-domain)" if "ptb" in row.get("in_domain", []) else ""


def interval(value: dict, digits: int = 3) -> str:
    return (
        f"{value['value']:.{digits}f} [{value['lower']:.{digits}f}, "
        f"{value['upper']:.{digits}f}]"
    )


def write_report(args, results, dense_metrics, lora_tokens_per_example) -> None:
    lines = [
        "# Recovery at matched token budgets (SmolLM2-135M, SAAP plans)",
        "",
        "Command (last invocation; rows of earlier invocations are kept, their "
        "pruning column says which method pruned): "
        f"`.venv/bin/python benchmarks/recovery_smollm2.py --prune-method "
        f"{args.prune_method} --ratios "
        f"{args.ratios} --budgets {args.budgets} --methods {args.methods} --windows "
        f"{args.windows} --fidelity-windows {args.fidelity_windows} --limit "
        f"{args.limit}` on 2 CPU threads ({compute_dtype()}). Perplexity: "
        f"{windows_text(args)} of the evaluation text (PTB test; the evaluation "
        "half of the Wikipedia prose). KL to dense and top-1 agreement: held-back "
        f"windows ({args.fidelity_windows}), 95% intervals. LoRA trains on the "
        f"Alpaca sample (mean {lora_tokens_per_example:.0f} tokens per record); kd "
        "and group (block-wise, then global distillation) on packed 256-token "
        "windows of the calibration halves of C4 and Wikipedia plus the Alpaca "
        "sample as plain text, 13-grams shared with evaluation text cut out. "
        "train s: the trainer's time; wall s: the whole recovery call, including "
        "filling the teacher's top-k cache (`kd_topk`) where a run computes it. "
        "PTB '(in-domain)': the arm distilled on PTB's train split "
        "(`kd_corpora` with `ptb_train`), so its PTB test perplexity is "
        "in-domain and not comparable with the other rows' as a measure of "
        "damage.",
        "",
        f"Dense: PTB {dense_metrics['perplexity']['ptb']:.1f}, Wiki "
        f"{dense_metrics['perplexity']['wiki']:.1f}.",
        "",
        "PTB / dense and PTB vs kd: the paired ratio of PTB perplexity to the "
        "dense model and to plain `kd` at the same pruning, ratio and budget, on "
        "the same windows (95% bootstrap interval; '-' where a row, or the dense "
        "record, predates per-window records).",
        "",
        "mean score: the zero-shot tasks' mean (acc_norm where the task defines "
        "it, acc otherwise) on the first `--limit` documents of each task; "
        "retention: mean score / dense on the same documents, paired bootstrap "
        "95% interval ('-' where the invocation ran no zero-shot, `--limit 0`).",
        "",
        "| pruning | ratio | recovery | budget | tokens | PTB | PTB / dense "
        "| PTB vs kd | Wiki | KL to dense | top-1 | mean score | retention "
        "| tokens/s | train s | wall s |",
        "|---|---|---|---:|---:|---:|---|---|---:|---|---|---:|---|---:|---:|---:|",
    ]
    dense_nll = dense_metrics.get("ptb_nll")
    reference = {
        (r.get("pruning", "saap"), r["ratio"], r["budget"]): r
        for r in results
        if r["method"] == "kd" and "ptb_nll" in r
    }
    for r in results:
        speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        ref = reference.get((r.get("pruning", "saap"), r["ratio"], r["budget"]))
        versus = "-"
        if ref is not None and "ptb_nll" in r and ref is not r:
            versus = interval(
                perplexity_ratio(
                    np.asarray(r["ptb_nll"]), np.asarray(ref["ptb_nll"])
                ).as_dict()
            )
        to_dense = "-"
        if dense_nll is not None and "ptb_nll" in r:
            to_dense = interval(
                perplexity_ratio(
                    np.asarray(r["ptb_nll"]), np.asarray(dense_nll)
                ).as_dict(),
                2,
            )
        score = "-" if r.get("mean_acc") is None else f"{r['mean_acc']:.3f}"
        retention = interval(r["retention"]) if r.get("retention") else "-"
        lines.append(
            f"| {r.get('pruning', 'saap')} | {r['ratio']:.0%} | {r['method']} "
            f"| {r['budget']:,} | {r['tokens']:,} "
            f"| {r['ppl']['ptb']:.1f}{in_domain_mark(r)} | {to_dense} | {versus} "
            f"| {r['ppl']['wiki']:.1f} "
            f"| {interval(r['kl'])} | {interval(r['top1'])} "
            f"| {score} | {retention} | "
            f"{speed} | "
            f"{r['train_s']:.0f} | {r.get('wall_s', 0):.0f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

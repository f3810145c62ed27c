"""Why FLAP wins at high ratios: FLAP and SAAP with their parts swapped (scores,
allocation, bias compensation), on the comparison's seed-0 importance scores.

Perplexity only (PTB and the Wikipedia evaluation half, the comparison's window
count), bfloat16, 2 threads. Usage (after ``saap compare`` or ``dvc repro
compare/dvc.yaml:importance``)::

    .venv/bin/python benchmarks/ablate_allocation.py --ratio 0.5 [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from saap.evaluation.perplexity import perplexity
from saap.evaluation.report import corpus_windows
from saap.methods import build_arm_plan
from saap.model import count_params, layer_shapes, load_model
from saap.params import load_section
from saap.prune import prune_model
from saap.scores import load_scores

VARIANTS = [
    # (label, importance, allocation, bias compensation)
    ("FLAP (as in the table)", "flap", "global", True),
    ("FLAP without bias compensation", "flap", "global", False),
    ("FLAP scores, uniform, bias comp.", "flap", "uniform", True),
    ("SAAP (as in the table)", "saap", "adaptive", False),
    ("SAAP + bias compensation", "saap", "adaptive", True),
    ("SAAP scores, global allocation", "saap", "global", False),
    ("SAAP scores, global, bias comp.", "saap", "global", True),
    ("element1, uniform, bias comp.", "taylor_element1", "uniform", True),
    ("Wanda-sp, uniform, bias comp.", "wanda_sp", "uniform", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument(
        "--importance", type=Path, default=Path("artifacts/compare/importance")
    )
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    compare = load_section("params.yaml", "compare")
    base_params = load_section("params.yaml", "prune")
    model, tokenizer = load_model(args.model)
    shapes, total = layer_shapes(model), count_params(model)
    scores = load_scores(args.importance / f"seed{args.seed}")
    corpora = {
        c: corpus_windows(tokenizer, args.text, c, 128, compare.ppl_windows)
        for c in ("ptb", "wiki")
    }
    lines = [
        f"# Ablation at {args.ratio:.0%}: scores x allocation x bias compensation",
        "",
        f"Command: `.venv/bin/python benchmarks/ablate_allocation.py --ratio "
        f"{args.ratio} --seed {args.seed}`; seed-{args.seed} importance scores of "
        f"the comparison, {compare.ppl_windows} windows of 128 tokens, bfloat16.",
        "",
        "| variant | scores | allocation | bias comp. | attention pruned | heads "
        "kept | channels kept | PTB | Wiki |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for label, importance, allocation, bias in VARIANTS:
        started = time.perf_counter()
        params = base_params.model_copy(
            update={
                "ratio": args.ratio,
                "importance": importance,
                "allocation": allocation,
                "bias_compensation": bias,
            }
        )
        plan = build_arm_plan(scores, shapes, total, params)
        pruned = prune_model(
            copy.deepcopy(model), plan, scores.input_means if bias else None
        ).to(torch.bfloat16)
        ppl = {c: perplexity(pruned, w) for c, w in corpora.items()}
        heads = sum(e.num_heads for e in plan.layers)
        channels = sum(e.intermediate_size for e in plan.layers)
        lines.append(
            f"| {label} | {importance} | {allocation} | {'yes' if bias else 'no'} | "
            f"{'yes' if plan.prune_attention else 'no'} | {heads} | {channels} | "
            f"{ppl['ptb']:.1f} | {ppl['wiki']:.1f} |"
        )
        print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    out = args.out or Path(f"docs/bench_ablation_{round(args.ratio * 100)}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

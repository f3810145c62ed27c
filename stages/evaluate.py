"""DVC stage ``evaluate``: perplexity, zero-shot accuracy and generations of a
checkpoint, written to ``metrics/eval/<variant>.json`` (and a readable
``<variant>.generations.md``).

Usage: ``python -m stages.evaluate --variant pruned --model models/pruned
--text data/text --eval data/eval --out metrics/eval/pruned.json``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saap.atomic import atomic_file, write_json
from saap.evaluation.report import evaluate_model, torch_dtype
from saap.evaluation.zeroshot import check_tasks
from saap.model import load_model
from saap.params import EvaluateParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.evaluate")


def generations_markdown(metrics: dict) -> str:
    lines = [f"# Generations of {metrics['variant']} ({metrics['checkpoint']})", ""]
    for sample in metrics["generations"]:
        lines += [f"**{sample['prompt']}**{sample['output']}", ""]
    return "\n".join(lines)


def run(
    params: EvaluateParams,
    variant: str,
    model_dir: Path,
    text_dir: Path,
    eval_dir: Path,
    out: Path,
) -> dict:
    check_tasks(list(params.tasks))
    model, tokenizer = load_model(model_dir, dtype=torch_dtype(params.dtype))
    metrics = evaluate_model(
        model, tokenizer, text_dir, eval_dir, params, variant, str(model_dir)
    )
    write_json(out, metrics)
    with atomic_file(out.with_suffix(".generations.md")) as tmp:
        tmp.write_text(generations_markdown(metrics))
    return metrics


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "evaluate")
    metrics = run(params, args.variant, args.model, args.text, args.eval, args.out)
    log.info(
        "%s: ppl %s, mean acc %s",
        args.variant,
        metrics["perplexity"],
        metrics["mean_acc"],
    )


if __name__ == "__main__":
    main()

"""DVC stage ``evaluate``: perplexity, zero-shot accuracy (with standard errors),
fidelity to the dense model and generations of a checkpoint, in the active
evaluation profile. Writes ``metrics/eval/<variant>.json``, the per-document
results ``<variant>.documents.json`` (what paired comparisons resample) and a
readable ``<variant>.generations.md``.

Usage: ``python -m stages.evaluate --variant pruned --model models/pruned
--dense models/base --text data/text --eval data/eval --out
metrics/eval/pruned.json`` (``--dense`` adds the fidelity metric)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saap.atomic import atomic_file, write_json
from saap.evaluation.report import evaluate_model, trained_in_domain
from saap.evaluation.zeroshot import check_tasks
from saap.model import load_model, torch_dtype
from saap.params import EvaluateParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.evaluate")


def generations_markdown(metrics: dict) -> str:
    lines = [f"# Generations of {metrics['variant']} ({metrics['checkpoint']})", ""]
    for sample in metrics["generations"]:
        lines += [f"**{sample['prompt']}**{sample['output']}", ""]
    return "\n".join(lines)


def documents_path(out: Path) -> Path:
    """``metrics/eval/pruned.json`` -> ``metrics/eval/pruned.documents.json``."""
    return out.with_suffix(".documents.json")


def run(
    params: EvaluateParams,
    variant: str,
    model_dir: Path,
    text_dir: Path,
    eval_dir: Path,
    out: Path,
    dense_dir: Path | None = None,
) -> dict:
    settings = params.resolved()
    check_tasks(list(settings.tasks))
    dtype = torch_dtype(settings.dtype)
    model, tokenizer = load_model(model_dir, dtype=dtype)
    reference = load_model(dense_dir, dtype=dtype)[0] if dense_dir else None
    metrics, documents = evaluate_model(
        model,
        tokenizer,
        text_dir,
        eval_dir,
        settings,
        variant,
        str(model_dir),
        reference=reference,
        in_domain=trained_in_domain(model_dir),
    )
    # the documents first: metrics without their documents could not be gated
    write_json(documents_path(out), documents)
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
    parser.add_argument(
        "--dense", type=Path, default=None, help="dense checkpoint: adds fidelity"
    )
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "evaluate")
    metrics = run(
        params, args.variant, args.model, args.text, args.eval, args.out, args.dense
    )
    log.info(
        "%s (%s profile): ppl %s, mean score %s",
        args.variant,
        metrics["profile"],
        metrics["perplexity"],
        metrics["mean_acc"],
    )


if __name__ == "__main__":
    main()

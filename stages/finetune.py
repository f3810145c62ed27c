"""DVC stage ``finetune``: recover a pruned checkpoint with the recovery method
``finetune.method`` (saap/recovery.py: LoRA or SAAP group fine-tuning), merge,
save a checkpoint of the same architecture.

Usage: ``python -m stages.finetune --model models/pruned --plan
artifacts/plan/plan.json --data data/instruct/alpaca.json --out models/finetuned
--report metrics/finetune.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from saap.assets import validate_alpaca
from saap.atomic import atomic_dir, write_json
from saap.errors import DataError
from saap.finetune import check_against_plan, merge, split_records
from saap.model import count_params, load_model, save_checkpoint
from saap.params import FinetuneParams, load_section
from saap.plan import load_plan
from saap.recovery import recover
from stages.common import guarded, setup

log = logging.getLogger("stages.finetune")


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the assets stage writes it (dvc repro assets)"
        )
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    return validate_alpaca(records, str(path))


def run(
    params: FinetuneParams,
    model_dir: Path,
    plan_path: Path,
    data: Path,
    out: Path,
    report: Path,
    resume_dir: Path,
) -> dict:
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    plan = load_plan(plan_path)
    check_against_plan(model, plan)
    train, val = split_records(read_records(data), params.val_size, params.seed)
    trained, result = recover(model, tokenizer, train, val, params, resume_dir, plan)
    merged = merge(trained)
    summary = {
        "schema": "saap.finetune/v1",
        "method": params.method,
        "params": count_params(merged),
        "trainable_params": result.trainable_params,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "tokens_per_s": result.tokens_per_s,
        "best_step": result.best_step,
        "val_losses": result.val_losses,
        "train_losses": result.train_losses,
        "truncated_examples": result.truncated,
        "resumed_from_step": result.resumed_from,
    }
    with atomic_dir(out) as tmp:
        save_checkpoint(merged, tokenizer, tmp, extra={"finetune": summary})
    write_json(report, summary)
    for stale in resume_dir.glob("finetune-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return summary


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/pruned"))
    parser.add_argument("--plan", type=Path, default=Path("artifacts/plan/plan.json"))
    parser.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    parser.add_argument("--out", type=Path, default=Path("models/finetuned"))
    parser.add_argument("--report", type=Path, default=Path("metrics/finetune.json"))
    parser.add_argument("--resume-dir", type=Path, default=Path(".saap/resume"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "finetune")
    summary = run(
        params, args.model, args.plan, args.data, args.out, args.report, args.resume_dir
    )
    log.info(
        "finetune (%s): %d steps, %d tokens, %.0f tokens/s, best step %d",
        summary["method"],
        summary["steps"],
        summary["tokens"],
        summary["tokens_per_s"],
        summary["best_step"],
    )


if __name__ == "__main__":
    main()

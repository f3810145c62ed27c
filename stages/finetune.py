"""DVC stage ``finetune``: recover a pruned checkpoint with the recovery method
``finetune.method`` (saap/recovery.py: LoRA, SAAP group fine-tuning, or
distillation from the dense model), merge, save a checkpoint of the same
architecture.

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
from saap.atomic import atomic_dir, atomic_file, write_json
from saap.errors import DataError, ParamsError
from saap.finetune import check_against_plan, merge, split_records
from saap.model import compute_dtype, count_params, load_model, save_checkpoint
from saap.params import (
    FinetuneParams,
    GatesParams,
    TeacherTextParams,
    load_finetune,
    load_for_profile,
    load_section,
)
from saap.plan import load_plan
from saap.recovery import RECOVERIES, DistillRecovery, RecoveryData, recover
from stages.common import guarded, setup

log = logging.getLogger("stages.finetune")
# facts of one run, kept in the report (metrics/finetune.json) only: how it
# went, not what the model is (the profile names a budget that steps and
# tokens record)
RUN_FACTS = ("seconds", "tokens_per_s", "resumed_from_step", "profile")


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


def write_curve(path: Path, result) -> None:
    """The loss curve as CSV (``dvc plots show`` draws it): per optimizer step
    the training loss, and the validation loss where one was measured."""
    rows = ["step,train_loss,val_loss"]
    for step, loss in enumerate(result.train_losses, start=1):
        val = result.val_losses.get(step)
        rows.append(f"{step},{loss:.6f},{'' if val is None else f'{val:.6f}'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def run(
    params: FinetuneParams,
    model_dir: Path,
    plan_path: Path,
    data: Path,
    out: Path,
    report: Path,
    curve: Path,
    resume_dir: Path,
    teacher_dir: Path | None = None,
    text_dir: Path | None = None,
    eval_dir: Path | None = None,
    profile: str | None = None,
    teacher_text_dir: Path | None = None,
) -> dict:
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    plan = load_plan(plan_path)
    check_against_plan(model, plan)
    train, val = split_records(read_records(data), params.val_size, params.seed)
    inputs = RecoveryData(
        train_records=train,
        val_records=val,
        text_dir=text_dir,
        eval_dir=eval_dir,
        teacher_text_dir=teacher_text_dir,
        # the dense teacher: frozen, in the compute dtype (bf16 where native)
        teacher=(
            (lambda: load_model(teacher_dir, dtype=compute_dtype())[0])
            if teacher_dir is not None
            else None
        ),
    )
    trained, result = recover(model, tokenizer, inputs, params, resume_dir, plan)
    merged = merge(trained)
    summary = {
        "schema": "saap.finetune/v1",
        "method": params.method,
        "profile": profile,
        "params": count_params(merged),
        "trainable_params": result.trainable_params,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "tokens_per_s": result.tokens_per_s,
        "best_step": result.best_step,
        "val_losses": result.val_losses,
        "val_loss": RECOVERIES.get(params.method).val_loss,
        "train_losses": result.train_losses,
        "truncated_examples": result.truncated,
        "resumed_from_step": result.resumed_from,
    }
    in_domain = RECOVERIES.get(params.method).in_domain(params)
    if in_domain:
        # evaluation corpora of the training text's own domain (PTB with
        # ptb_train): the evaluation reports them as in-domain, no gate uses them
        summary["in_domain"] = in_domain
    # the checkpoint records what the model is, not how this run went (time,
    # resume): the same inputs then give a byte-identical directory, so DVC and
    # the registry see an unchanged model as unchanged
    model_record = {k: v for k, v in summary.items() if k not in RUN_FACTS}
    with atomic_dir(out) as tmp:
        save_checkpoint(merged, tokenizer, tmp, extra={"finetune": model_record})
    write_json(report, summary)
    write_curve(curve, result)
    for stale in resume_dir.glob("finetune-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return summary


def check_gate_corpus(params: FinetuneParams, gates: GatesParams) -> None:
    """Refuse, before training, a recovery whose text makes the perplexity
    gates' corpus in-domain (the gates would fail closed after the whole run)."""
    in_domain = RECOVERIES.get(params.method).in_domain(params)
    if gates.ppl_corpus in in_domain:
        raise ParamsError(
            f"finetune.kd_corpora {params.kd_corpora} makes {gates.ppl_corpus} "
            f"in-domain, and gates.ppl_corpus is {gates.ppl_corpus!r}: the "
            "perplexity gates cannot judge a model on text of its own training "
            "domain; set gates.ppl_corpus to wiki or c4, or leave "
            f"{gates.ppl_corpus}_train out of finetune.kd_corpora"
        )


def check_teacher_text(
    params: FinetuneParams, teacher_text: TeacherTextParams, profile: str
) -> None:
    """Refuse, before loading anything, a distillation on the corpus
    ``teacher`` where the same run profile samples no teacher text (the
    teacher-text stage then wrote an empty corpus)."""
    distils = isinstance(RECOVERIES.get(params.method), DistillRecovery)
    if distils and "teacher" in params.kd_corpora and teacher_text.tokens == 0:
        raise ParamsError(
            f"finetune.kd_corpora {params.kd_corpora} in run profile {profile!r} "
            f"reads the teacher's samples, but teacher_text.tokens is 0 in that "
            f"profile: set teacher_text.profiles.{profile}.tokens (or "
            "teacher_text.tokens; e.g. 655360), or leave teacher out of "
            "finetune.kd_corpora"
        )


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/pruned"))
    parser.add_argument("--plan", type=Path, default=Path("artifacts/plan/plan.json"))
    parser.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    parser.add_argument("--out", type=Path, default=Path("models/finetuned"))
    parser.add_argument("--report", type=Path, default=Path("metrics/finetune.json"))
    parser.add_argument("--curve", type=Path, default=Path("metrics/finetune_loss.csv"))
    parser.add_argument("--resume-dir", type=Path, default=Path(".saap/resume"))
    parser.add_argument(
        "--teacher", type=Path, default=None, help="dense model (kd): models/base"
    )
    parser.add_argument(
        "--text", type=Path, default=None, help="text corpora (kd): data/text"
    )
    parser.add_argument(
        "--teacher-text",
        type=Path,
        default=None,
        help="the dense model's samples (kd_corpora: teacher): data/teacher_text",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="zero-shot task records (kd; their text is kept out): data/eval",
    )
    args = parser.parse_args(argv)
    setup()
    # the active run profile (evaluate.profile; the nightly flow sets it) may
    # override the budget: finetune.profiles
    params, profile = load_finetune(args.params)
    check_gate_corpus(params, load_section(args.params, "gates"))
    teacher_text, _ = load_for_profile(args.params, "teacher_text")
    check_teacher_text(params, teacher_text, profile)
    log.info(
        "finetune profile %s: %s, %s steps of %d windows",
        profile,
        params.method,
        params.max_steps,
        params.batch_size,
    )
    summary = run(
        params,
        args.model,
        args.plan,
        args.data,
        args.out,
        args.report,
        args.curve,
        args.resume_dir,
        args.teacher,
        args.text,
        args.eval,
        profile,
        args.teacher_text,
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

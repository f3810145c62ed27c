"""DVC stage ``teacher-text``: the dense model's own samples, as distillation
text (the corpus ``teacher`` of ``finetune.kd_corpora``; saap/teacher_text.py).

With ``teacher_text.tokens: 0`` it writes an empty corpus without loading the
model (the corpus ``teacher`` is then refused with what to set). Sampling is
kept batch by batch under the resume folder, so a killed run goes on where it
stopped; batches of the previous output made with the same settings and model
are reused, so raising ``teacher_text.tokens`` samples only the new batches.

Usage: ``python -m stages.teacher_text --model models/base --out
data/teacher_text --report metrics/teacher_text.json``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from saap.atomic import atomic_dir, write_json
from saap.distill import weights_digest
from saap.model import load_model, torch_dtype
from saap.params import TeacherTextParams, load_section
from saap.teacher_text import (
    SCHEMA,
    generate_teacher_text,
    read_batches,
    save_teacher_text,
    settings,
)
from stages.common import guarded, setup

log = logging.getLogger("stages.teacher_text")


def run(
    params: TeacherTextParams,
    model_dir: Path,
    out_dir: Path,
    resume_dir: Path,
    report: Path | None = None,
) -> dict:
    """Write the samples and their settings to ``out_dir``; return the run's
    record (also written to ``report``: time, tokens sampled and reused)."""
    began = time.perf_counter()
    if params.tokens == 0:
        documents, meta, sampled = [], {"schema": SCHEMA, "samples": 0, "tokens": 0}, 0
    else:
        model, tokenizer = load_model(model_dir, dtype=torch_dtype(params.dtype))
        wanted = settings(params, tokenizer, weights_digest(model))
        partial = resume_dir / "teacher-text"
        # the previous output and a killed run's batches: the same settings
        # sample the same batches, so the longer list is taken as it is
        done = max(
            read_batches(out_dir, wanted), read_batches(partial, wanted), key=len
        )

        def keep(texts: list[str]) -> None:
            with atomic_dir(partial) as tmp:
                save_teacher_text(
                    texts,
                    {"schema": SCHEMA, "samples": len(texts), "settings": wanted},
                    tmp,
                )

        documents, sampled = generate_teacher_text(
            model, tokenizer, params, done, on_batch=keep
        )
        meta = {
            "schema": SCHEMA,
            "samples": len(documents),
            "tokens": len(documents) * params.length,
            "settings": wanted,
        }
    with atomic_dir(out_dir) as tmp:
        save_teacher_text(documents, meta, tmp)
    if params.tokens:
        shutil.rmtree(resume_dir / "teacher-text", ignore_errors=True)
    seconds = time.perf_counter() - began
    record = {
        "samples": meta["samples"],
        "tokens": meta["tokens"],
        "sampled_tokens": sampled,
        "reused_tokens": meta["tokens"] - sampled,
        "seconds": round(seconds, 1),
        "sampled_tokens_per_s": round(sampled / seconds, 1) if sampled else None,
    }
    if report is not None:
        write_json(report, record)
    return record


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--out", type=Path, default=Path("data/teacher_text"))
    parser.add_argument(
        "--report", type=Path, default=Path("metrics/teacher_text.json")
    )
    parser.add_argument("--resume-dir", type=Path, default=Path(".saap/resume"))
    args = parser.parse_args(argv)
    setup()
    params = load_section(args.params, "teacher_text")
    record = run(params, args.model, args.out, args.resume_dir, args.report)
    if record["tokens"]:
        log.info(
            "teacher text: %d samples (%d tokens; %d sampled, %d reused) in %.0f s",
            record["samples"],
            record["tokens"],
            record["sampled_tokens"],
            record["reused_tokens"],
            record["seconds"],
        )
    else:
        log.info("teacher text: none (teacher_text.tokens is 0)")


if __name__ == "__main__":
    main()

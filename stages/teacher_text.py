"""DVC stage ``teacher-text``: the dense model's own samples, as distillation
text (the corpus ``teacher`` of ``finetune.kd_corpora``; saap/teacher_text.py).

The settings are those of the active run profile (``evaluate.profile``):
``teacher_text.profiles.nightly`` may ask for text where the quick profile
asks for none. With ``tokens: 0`` it writes an empty corpus without loading
the model (the corpus ``teacher`` is then refused with what to set).

Samples are kept batch by batch under the resume folder, one folder per
sampling settings and model (``teacher-text/<key>``), and stay there after
the run: a killed run goes on where it stopped, raising ``tokens`` samples
only the new batches, and a quick run between two nightly ones (which writes
the empty corpus) costs the next nightly run no sampling.

Usage: ``python -m stages.teacher_text --model models/base --out
data/teacher_text --report metrics/teacher_text.json``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

from saap.atomic import atomic_dir, write_json
from saap.distill import weights_digest
from saap.model import load_model, torch_dtype
from saap.params import TeacherTextParams, load_for_profile
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
        kept = kept_dir(resume_dir, wanted)
        # the previous output and the kept batches (a killed run's, or an
        # earlier profile's): the same settings sample the same batches, so
        # the longer list is taken as it is
        kept_batches = read_batches(kept, wanted)
        done = max(read_batches(out_dir, wanted), kept_batches, key=len)
        held = sum(map(len, kept_batches))

        def keep(texts: list[str]) -> None:
            nonlocal held
            if len(texts) <= held:
                return
            with atomic_dir(kept) as tmp:
                save_teacher_text(
                    texts,
                    {"schema": SCHEMA, "samples": len(texts), "settings": wanted},
                    tmp,
                )
            held = len(texts)

        documents, sampled = generate_teacher_text(
            model, tokenizer, params, done, on_batch=keep
        )
        # batches reused from the previous output are kept too
        keep(documents)
        meta = {
            "schema": SCHEMA,
            "samples": len(documents),
            "tokens": len(documents) * params.length,
            "settings": wanted,
        }
    with atomic_dir(out_dir) as tmp:
        save_teacher_text(documents, meta, tmp)
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


def kept_dir(resume_dir: Path, wanted: dict) -> Path:
    """Where the batches of the sampling settings ``wanted`` are kept."""
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()
    return Path(resume_dir) / "teacher-text" / key[:16]


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
    # the active run profile (evaluate.profile; the nightly flow sets it) may
    # ask for text: teacher_text.profiles
    params, profile = load_for_profile(args.params, "teacher_text")
    log.info("teacher text profile %s: %d tokens", profile, params.tokens)
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

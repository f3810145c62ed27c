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
import logging
from pathlib import Path

import torch

from saap.atomic import atomic_dir, write_json
from saap.compare import METHODS, run_arm
from saap.errors import DataError
from saap.evaluation.zeroshot import check_tasks
from saap.model import load_model
from saap.params import load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.compare")

ESTIMATORS = sorted(
    {m.importance for m in METHODS.values()} - {"saap"}
    | {"taylor_vector", "taylor_element1", "taylor_element2"}
)


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
        estimators=ESTIMATORS, batch_size=base_importance.batch_size
    )
    with atomic_dir(args.out) as tmp:
        for seed in compare.seeds:
            calib = calibration.model_copy(update={"seed": seed, "holdout_samples": 0})
            tensors, meta = make_calibration(tokenizer, args.text, calib)
            seed_dir = tmp / f"seed{seed}"
            seed_dir.mkdir()
            save_calibration(tensors, meta, seed_dir)
            scores = compute(
                params.model_copy(update={"seed": seed}), args.model, seed_dir
            )
            save_scores(scores, seed_dir)
            log.info("seed %d: importance in %.1f s", seed, scores.meta["seconds"])


def arm(args: argparse.Namespace) -> None:
    from stages.finetune import read_records

    compare = load_section(args.params, "compare")
    prune = load_section(args.params, "prune")
    finetune = load_section(args.params, "finetune")
    evaluate = load_section(args.params, "evaluate")
    bench = load_section(args.params, "bench")
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
    one.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    one.add_argument("--plans", type=Path, default=Path("artifacts/compare/arm"))
    one.add_argument("--out", type=Path, default=Path("metrics/compare/arm.json"))
    args = parser.parse_args(argv)
    setup()
    {"importance": importance, "arm": arm}[args.command](args)


if __name__ == "__main__":
    main()

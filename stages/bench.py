"""DVC stage ``bench``: the edge benchmark of one checkpoint, written to
``metrics/bench/<variant>.json``; with ``--dense`` (the dense model's bench JSON)
the measured and ideal speedups over the dense model are added.

Usage: ``python -m stages.bench --variant pruned --model models/pruned
--out metrics/bench/pruned.json [--dense metrics/bench/dense.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
from pathlib import Path

from saap.atomic import write_json
from saap.evaluation.bench import benchmark_with
from saap.evaluation.report import torch_dtype
from saap.model import load_model
from saap.params import BenchParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.bench")

SCHEMA = "saap.bench/v1"


def add_speedups(metrics: dict, dense: dict) -> dict:
    """Measured speedups over ``dense`` beside the ideal (weight bytes) one."""
    metrics["speedup_vs_dense"] = {
        "decode_measured": metrics["decode_tokens_per_s"]
        / dense["decode_tokens_per_s"],
        "prefill_measured": metrics["prefill_tokens_per_s"]
        / dense["prefill_tokens_per_s"],
        "decode_ideal": dense["weight_bytes_per_token"]
        / metrics["weight_bytes_per_token"],
        "macs_ratio": dense["macs_per_token"] / metrics["macs_per_token"],
    }
    return metrics


def run(
    params: BenchParams,
    variant: str,
    model_dir: Path,
    out: Path,
    dense_path: Path | None,
) -> dict:
    model, _ = load_model(model_dir, dtype=torch_dtype(params.dtype))
    metrics = {"schema": SCHEMA, "variant": variant, "checkpoint": str(model_dir)}
    metrics |= benchmark_with(model, model_dir, params)
    # peak resident memory of this process: load + benchmark of this one model
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dense_path is not None:
        if not dense_path.is_file():
            raise FileNotFoundError(
                f"{dense_path} is missing; run the bench stage of the dense model first"
            )
        add_speedups(metrics, json.loads(dense_path.read_text()))
    write_json(out, metrics)
    return metrics


@guarded
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dense", type=Path, default=None)
    args = parser.parse_args(argv)
    params = load_section(args.params, "bench")
    setup(params.threads)
    metrics = run(params, args.variant, args.model, args.out, args.dense)
    log.info(
        "%s: decode %.1f tok/s, prefill %.1f tok/s",
        args.variant,
        metrics["decode_tokens_per_s"],
        metrics["prefill_tokens_per_s"],
    )


if __name__ == "__main__":
    main()

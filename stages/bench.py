"""DVC stage ``bench``: the edge benchmark of one checkpoint, written to
``metrics/bench/<variant>.json``; with ``--dense`` (the dense checkpoint) the
candidate and the dense model are timed interleaved in this process and the
speedups, with their intervals, are added beside the ideal one.

Usage: ``python -m stages.bench --variant pruned --model models/pruned
--out metrics/bench/pruned.json [--dense models/base]``
"""

from __future__ import annotations

import argparse
import logging
import resource
from pathlib import Path

from saap.atomic import write_json
from saap.evaluation.bench import benchmark_against, benchmark_with
from saap.model import load_model, torch_dtype
from saap.params import BenchParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.bench")

SCHEMA = "saap.bench/v1"


def run(
    params: BenchParams,
    variant: str,
    model_dir: Path,
    out: Path,
    dense_dir: Path | None,
) -> dict:
    dtype = torch_dtype(params.dtype)
    model, _ = load_model(model_dir, dtype=dtype)
    metrics = {"schema": SCHEMA, "variant": variant, "checkpoint": str(model_dir)}
    if dense_dir is None:
        metrics |= benchmark_with(model, model_dir, params)
    else:
        dense, _ = load_model(dense_dir, dtype=dtype)
        metrics |= benchmark_against(model, model_dir, dense, params)
    # peak resident memory of this process: load + benchmark
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    if speedup := metrics.get("speedup_vs_dense"):
        decode = speedup["decode"]
        log.info(
            "%s: decode speedup %.3f [%.3f, %.3f] (ideal %.3f), interleaved",
            args.variant,
            decode["value"],
            decode["lower"],
            decode["upper"],
            speedup["decode_ideal"],
        )


if __name__ == "__main__":
    main()

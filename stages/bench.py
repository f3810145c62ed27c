"""DVC stage ``bench``: the edge benchmark of one checkpoint, written to
``metrics/bench/<variant>.json``, in two runtimes:

- ``llamacpp`` (with ``--gguf``, the export stage's folder): llama.cpp's
  llama-bench on each exported GGUF type; with ``--dense-gguf`` the dense file of
  the same type runs interleaved with the candidate and each speedup gets its
  interval beside the ideal one. The ``decode_speedup`` gate reads these.
- PyTorch eager (the second runtime, kept for reference): with ``--dense`` (the
  dense checkpoint) timed interleaved in this process (``speedup_vs_dense``),
  ``bench.eager_repeats`` rounds (no gate reads it; the llama.cpp runs keep
  ``bench.repeats``).

Usage: ``python -m stages.bench --variant pruned --model models/pruned
--out metrics/bench/pruned.json [--dense models/base] [--gguf models/gguf/pruned
--dense-gguf models/gguf/dense]``
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
from collections.abc import Mapping
from pathlib import Path

from saap.atomic import write_json
from saap.errors import DataError
from saap.evaluation import bench
from saap.evaluation.bench import benchmark_against, benchmark_with, llamacpp_benchmark
from saap.model import load_model, torch_dtype
from saap.params import BenchParams, load_section
from stages.common import guarded, setup

log = logging.getLogger("stages.bench")

SCHEMA = "saap.bench/v1"


def gguf_files(folder: Path) -> dict[str, Path]:
    """{type: file} of an export folder (its export.json)."""
    manifest = folder / "export.json"
    if not manifest.is_file():
        raise DataError(
            f"{manifest} does not exist; run the export stage first "
            f"(`dvc repro export@<variant>`)"
        )
    files = json.loads(manifest.read_text()).get("gguf", {}).get("files", {})
    return {kind: folder / entry["file"] for kind, entry in files.items()}


def run(
    params: BenchParams,
    variant: str,
    model_dir: Path,
    out: Path,
    dense_dir: Path | None,
    gguf_dir: Path | None = None,
    dense_gguf_dir: Path | None = None,
) -> dict:
    # the GGUF inputs are checked before any timing starts
    gguf = gguf_files(gguf_dir) if gguf_dir is not None else None
    dense_gguf = gguf_files(dense_gguf_dir) if dense_gguf_dir is not None else None
    if gguf is not None and dense_gguf is not None and set(dense_gguf) != set(gguf):
        raise DataError(
            f"{gguf_dir} has types {sorted(gguf)}, {dense_gguf_dir} "
            f"{sorted(dense_gguf)}; export both with the same export.gguf_types"
        )
    dtype = torch_dtype(params.dtype)
    model, _ = load_model(model_dir, dtype=dtype)
    metrics = {"schema": SCHEMA, "variant": variant, "checkpoint": str(model_dir)}
    eager = params.model_copy(
        update={"repeats": params.eager_repeats or params.repeats}
    )
    if dense_dir is None:
        metrics |= benchmark_with(model, model_dir, eager)
    else:
        dense, _ = load_model(dense_dir, dtype=dtype)
        metrics |= benchmark_against(model, model_dir, dense, eager)
    metrics["runtime"] = "pytorch-eager"
    # peak resident memory of this process: load + benchmark
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gguf_dir is not None:
        from saap.runtime.llamacpp import ensure_llamacpp

        metrics["llamacpp"] = llamacpp_benchmark(
            ensure_llamacpp(), gguf, params, dense_gguf
        )
    write_json(out, metrics)
    return metrics


def dense_from_interleaved(
    candidate: dict, dense, checkpoint: Path, dense_gguf: Mapping[str, Path] | None
) -> dict:
    """The dense model's edge record from a candidate's bench record, whose
    rounds timed the dense model interleaved with the candidate (PyTorch eager
    ``speedup_vs_dense.timings.dense``, llama.cpp ``types.<t>.timings.dense``):
    the dense figures of the same run, on the same machine state, as the
    speedups that gate. Nothing is timed here; the static figures come from the
    loaded ``dense`` model and its GGUF files. There is no process of its own to
    take a peak resident memory from, so the record has none."""
    speedup = candidate.get("speedup_vs_dense")
    if not speedup:
        raise ValueError(
            f"bench record of {candidate.get('variant')!r} holds no dense timings "
            "(speedup_vs_dense); bench it with --dense models/base"
        )
    rounds = speedup["timings"]["dense"]
    prompt_len = candidate["prompt_len"]
    record = (
        bench.static_metrics(dense, checkpoint, candidate["context_len"])
        | {
            key: candidate[key]
            for key in ("threads", "prompt_len", "decode_tokens", "repeats")
        }
        | bench.speed_metrics(
            [prompt_len / v for v in rounds["prefill"]],
            [1.0 / v for v in rounds["decode"]],
            prompt_len,
        )
    )
    record["measured_with"] = candidate.get("variant")
    runtime = candidate.get("llamacpp")
    if runtime and dense_gguf is not None:
        types = {}
        for kind, entry in runtime["types"].items():
            if "timings" not in entry or "dense" not in entry["timings"]:
                raise ValueError(
                    f"llama.cpp {kind} of {candidate.get('variant')!r} was not run "
                    "with the dense file (bench with --dense-gguf)"
                )
            if kind not in dense_gguf:
                raise ValueError(
                    f"no dense {kind} GGUF file; export both with the same "
                    "export.gguf_types"
                )
            timings = entry["timings"]["dense"]
            types[kind] = {
                "file_bytes": dense_gguf[kind].stat().st_size,
                "tensor_bytes": bench.gguf_tensor_bytes(dense_gguf[kind]),
                "prefill_tokens_per_s": statistics.median(timings["prefill"]),
                "decode_tokens_per_s": statistics.median(timings["decode"]),
                "timings": {"dense": timings},
            }
        record["llamacpp"] = {k: v for k, v in runtime.items() if k != "types"} | {
            "types": types
        }
    return record


def derive_dense(
    candidate_path: Path, model_dir: Path, gguf_dir: Path | None, out: Path
) -> dict:
    """``metrics/bench/dense.json`` from the dense rounds of a candidate's record
    (:func:`dense_from_interleaved`)."""
    if not candidate_path.is_file():
        raise DataError(
            f"{candidate_path} does not exist; bench the candidate first "
            "(`dvc repro bench@<gates.variant>`)"
        )
    candidate = json.loads(candidate_path.read_text())
    gguf = gguf_files(gguf_dir) if gguf_dir is not None else None
    dense, _ = load_model(model_dir, dtype=torch_dtype(candidate.get("dtype", "auto")))
    try:
        record = dense_from_interleaved(candidate, dense, model_dir, gguf)
    except ValueError as exc:
        raise DataError(f"{candidate_path}: {exc}") from None
    metrics = {"schema": SCHEMA, "variant": "dense", "checkpoint": str(model_dir)}
    metrics |= record | {"runtime": "pytorch-eager"}
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
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--dense-gguf", type=Path, default=None)
    parser.add_argument(
        "--from-interleaved",
        type=Path,
        default=None,
        help="a candidate's bench record: write the dense model's record from the "
        "dense rounds timed in it (--variant dense --model models/base "
        "--gguf models/gguf/dense), timing nothing",
    )
    args = parser.parse_args(argv)
    params = load_section(args.params, "bench")
    setup(params.threads)
    if args.from_interleaved is not None:
        metrics = derive_dense(args.from_interleaved, args.model, args.gguf, args.out)
    else:
        metrics = run(
            params,
            args.variant,
            args.model,
            args.out,
            args.dense,
            args.gguf,
            args.dense_gguf,
        )
    log.info(
        "%s: decode %.1f tok/s, prefill %.1f tok/s",
        args.variant,
        metrics["decode_tokens_per_s"],
        metrics["prefill_tokens_per_s"],
    )
    for kind, entry in (metrics.get("llamacpp") or {}).get("types", {}).items():
        speed = ""
        if "speedup" in entry:
            decode = entry["speedup"]["decode"]
            speed = (
                f"; decode speedup {decode['value']:.3f} [{decode['lower']:.3f}, "
                f"{decode['upper']:.3f}] (ideal {entry['decode_ideal']:.3f})"
            )
        log.info(
            "%s llama.cpp %s: decode %.1f tok/s, prefill %.1f tok/s%s",
            args.variant,
            kind,
            entry["decode_tokens_per_s"],
            entry["prefill_tokens_per_s"],
            speed,
        )
    if speedup := metrics.get("speedup_vs_dense"):
        decode = speedup["decode"]
        log.info(
            "%s: pytorch-eager decode speedup %.3f [%.3f, %.3f] (ideal %.3f)",
            args.variant,
            decode["value"],
            decode["lower"],
            decode["upper"],
            speedup["decode_ideal"],
        )


if __name__ == "__main__":
    main()

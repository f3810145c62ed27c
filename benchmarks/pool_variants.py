"""Pool the per-seed rows of several ``benchmarks/saap_variants.py`` runs (JSON
written beside their reports, disjoint calibration seeds, the same code
revision for the variants compared) and report, per ratio and metric, each
variant against one reference variant paired by seed over every seed found:
the geometric mean of the per-seed ratios with its 95% t-interval
(``saap.comparison.seed_ratio``), the mean and sample sd of each side, and
whether the interval excludes a tie. Usage::

    .venv/bin/python benchmarks/pool_variants.py docs/bench_a.json \
        docs/bench_b.json --reference LABEL --ratio 0.2 \
        [--variants LABEL ...] [--out docs/bench_pooled.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saap.comparison import seed_ratio  # noqa: E402
from saap.errors import DataError  # noqa: E402

METRICS = ("ptb", "wiki", "kl")


def pooled(paths: list[Path], ratio: str) -> dict[str, dict[int, dict]]:
    """label -> seed -> row, over every file; a seed seen twice for one label is
    an error (the runs must use disjoint seeds)."""
    out: dict[str, dict[int, dict]] = {}
    for path in paths:
        results = json.loads(path.read_text())["results"].get(ratio, {})
        for label, rows in results.items():
            seeds = out.setdefault(label, {})
            for row in rows:
                if row["seed"] in seeds:
                    raise DataError(
                        f"{path}: seed {row['seed']} of {label!r} is also in an "
                        "earlier file; pool runs of disjoint seeds"
                    )
                seeds[row["seed"]] = row
    return out


def report(
    rows: dict[str, dict[int, dict]], reference: str, variants: list[str] | None
) -> list[str]:
    if reference not in rows:
        raise DataError(
            f"reference {reference!r} is in none of the files; labels: {sorted(rows)}"
        )
    lines = [
        "| variant | seeds | metric | variant mean ± sd | reference mean ± sd | "
        "variant / reference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in variants or sorted(rows):
        if label == reference:
            continue
        if label not in rows:
            raise DataError(f"variant {label!r} is in none of the files")
        seeds = sorted(set(rows[label]) & set(rows[reference]))
        for metric in METRICS:
            if any(metric not in rows[x][s] for x in (label, reference) for s in seeds):
                continue
            a = [rows[label][s][metric] for s in seeds]
            b = [rows[reference][s][metric] for s in seeds]
            ci = seed_ratio(a, b)
            verdict = (
                "better"
                if ci.upper < 1
                else "worse"
                if ci.lower > 1
                else "not separated"
            )
            lines.append(
                f"| {label} | {','.join(map(str, seeds))} | {metric} | "
                f"{statistics.mean(a):.3f} ± {statistics.stdev(a):.3f} | "
                f"{statistics.mean(b):.3f} ± {statistics.stdev(b):.3f} | "
                f"{ci.value:.3f} [{ci.lower:.3f}, {ci.upper:.3f}] | {verdict} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("Usage")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--ratio", required=True, help="e.g. 0.2 (as in the JSON)")
    parser.add_argument("--variants", nargs="*")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = pooled(args.files, args.ratio)
    lines = [
        f"Pooled from {', '.join(str(p) for p in args.files)} at ratio {args.ratio}; "
        f"reference: {args.reference}. Below 1 is better than the reference; "
        "'better'/'worse' only where the 95% interval excludes 1.",
        "",
        *report(rows, args.reference, args.variants),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

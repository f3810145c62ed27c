"""How the number of calibration windows moves the seed spread of pruned
perplexity: reads the JSON files of `benchmarks/saap_variants.py` runs that
differ only in ``--samples`` (same seeds, same variants, same evaluation
windows) and writes one table per variant: mean PTB and Wikipedia perplexity,
the standard deviation over seeds, and the ratio of standard deviations between
each run and the first, with its 95% interval from the F distribution (normal
perplexities over seeds assumed; with 5 seeds a halving is shown only where the
whole interval lies at or below 0.5). Also the paired difference of the means
(same seeds: seed s of one run against seed s of the other), t-interval.

Usage::

    .venv/bin/python benchmarks/calibration_spread.py \\
        docs/bench_calibration_32.json docs/bench_calibration_128.json \\
        --out docs/bench_calibration.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from scipy import stats as sps


def sd_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """sd(b) / sd(a) with its 95% F interval."""
    ratio = statistics.variance(b) / statistics.variance(a)
    dfb, dfa = len(b) - 1, len(a) - 1
    low = ratio / sps.f.ppf(0.975, dfb, dfa)
    high = ratio / sps.f.ppf(0.025, dfb, dfa)
    return math.sqrt(ratio), math.sqrt(low), math.sqrt(high)


def paired_log_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Geometric mean of b/a over paired seeds with its 95% t interval."""
    logs = [math.log(y / x) for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(logs)
    half = sps.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / len(logs) ** 0.5
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--ratio", default="0.2")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_calibration.md"))
    args = parser.parse_args()
    merged: dict[int, dict] = {}
    sources: dict[int, list[Path]] = {}
    for path in args.runs:
        data = json.loads(path.read_text())
        samples = data.get("samples")
        if samples is None:  # runs before the JSON recorded it
            text = path.with_suffix(".md").read_text()
            samples = int(re.search(r"calibration (\d+) x \d+ tokens", text)[1])
        sources.setdefault(samples, []).append(path)
        table = merged.setdefault(samples, {})
        for label, rows in data["results"][args.ratio].items():
            table.setdefault(label, []).extend(rows)
    for table in merged.values():
        for label, rows in table.items():
            seeds = [r["seed"] for r in rows]
            if len(set(seeds)) != len(seeds):
                raise SystemExit(f"{label}: seed given twice ({seeds})")
            rows.sort(key=lambda r: r["seed"])
    order = list(merged)  # the first file's window count is the reference
    first_n = order[0]
    runs = [(n, sources[n], merged[n]) for n in order]
    table = merged[first_n]
    lines = [
        "# Calibration windows against the seed spread",
        "",
        "Runs of `benchmarks/saap_variants.py` that differ only in the number of "
        "calibration windows (128 tokens of C4 each; seed s draws the windows "
        "and seeds the pruning): "
        + ", ".join(
            f"{n} windows ({', '.join(p.name for p in paths)})" for n, paths, _ in runs
        )
        + f"; ratio {float(args.ratio):.0%}; evaluation on the same 64 PTB and "
        "64 Wikipedia windows. Written by `benchmarks/calibration_spread.py "
        + " ".join(str(p) for p in args.runs)
        + "`.",
        "",
        "sd: standard deviation of perplexity over seeds. sd ratio: sd of the run "
        f"/ sd of the {first_n}-window run, 95% F interval (normal perplexities "
        "assumed). Mean ratio: the paired ratio of perplexities (seed by seed) "
        f"to the {first_n}-window run, 95% t interval.",
        "",
    ]
    for label in table:
        lines += [
            f"## {label}",
            "",
            "| windows | seeds | PTB mean | PTB sd | PTB sd ratio | PTB mean ratio "
            "| Wiki mean | Wiki sd | Wiki sd ratio |",
            "|---:|---:|---:|---:|---|---|---:|---:|---|",
        ]
        base_rows = {r["seed"]: r for r in table[label]}
        base = {c: [r[c] for r in table[label]] for c in ("ptb", "wiki")}
        for n, _, data in runs:
            rows = data[label]
            cells = [str(n), ", ".join(str(r["seed"]) for r in rows)]
            for corpus in ("ptb", "wiki"):
                values = [r[corpus] for r in rows]
                cells += [
                    f"{statistics.fmean(values):.1f}",
                    f"{statistics.stdev(values):.1f}",
                ]
                if n == first_n:
                    cells.append("reference")
                else:
                    r, lo, hi = sd_ratio(base[corpus], values)
                    cells.append(f"{r:.2f} [{lo:.2f}, {hi:.2f}]")
                if corpus == "ptb":
                    if n == first_n:
                        cells.append("reference")
                    else:
                        shared = [r for r in rows if r["seed"] in base_rows]
                        r, lo, hi = paired_log_ratio(
                            [base_rows[x["seed"]][corpus] for x in shared],
                            [x[corpus] for x in shared],
                        )
                        verdict = "" if lo < 1 < hi else " (separated)"
                        cells.append(f"{r:.3f} [{lo:.3f}, {hi:.3f}]{verdict}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

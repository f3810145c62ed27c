"""The importance stage's calibration statistics with each way of forming the
per-window gradients (``importance.per_window``), side by side in one process:

- ``stored``: the batched pass keeps every projection's input and output
  gradient, and each window's gradient is formed from them afterwards;
- ``second_pass``: a second forward and backward, one window at a time.

The two alternate, order reversed every other round; the time ratio
stored/second_pass is paired by round (95% t-interval). The statistics of the
two are compared once: largest relative difference of the Fisher diagonal and
of the leave-one-out atoms (float32 rounding only), and the peak memory of
each in a child process of its own.

Usage (after ``dvc repro calibration``)::

    .venv/bin/python benchmarks/importance_per_window.py [--rounds 3]
        [--out docs/bench_importance_per_window.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

from saap.calibration import load_calibration
from saap.comparison import seed_ratio
from saap.importance.estimators import collect_for
from saap.model import load_model
from saap.params import load_section

MODES = ("stored", "second_pass")


def collect(model, windows, params, mode: str):
    return collect_for(
        model,
        windows,
        params.batch_size,
        list(params.estimators),
        progress=False,
        per_window=mode,
    )


def largest_difference(a, b) -> float:
    worst = 0.0
    for la, lb in zip(a.layers, b.layers, strict=True):
        pairs = [(la.fisher[n], lb.fisher[n]) for n in la.fisher]
        for metric in la.loo_atoms:
            for sa, sb in zip(la.loo_atoms[metric], lb.loo_atoms[metric], strict=True):
                pairs += [(sa[k], sb[k]) for k in sa]
        for x, y in pairs:
            scale = float(y.abs().max())
            if scale > 0:
                worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def peak_of(args, mode: str, queue) -> None:
    torch.set_num_threads(2)
    params = load_section(args.params, "importance")
    model, _ = load_model(args.model, dtype=torch.float32)
    windows = load_calibration(args.calibration)["input_ids"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    collect(model, windows, params, mode)
    queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    # peak memory first, each mode alone in a fresh process
    peaks = {}
    context = multiprocessing.get_context("spawn")
    for mode in MODES:
        queue = context.Queue()
        child = context.Process(target=peak_of, args=(args, mode, queue))
        child.start()
        peaks[mode] = queue.get()
        child.join()

    torch.set_num_threads(2)
    params = load_section(args.params, "importance")
    model, _ = load_model(args.model, dtype=torch.float32)
    windows = load_calibration(args.calibration)["input_ids"]
    seconds = {mode: [] for mode in MODES}
    kept = {}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            started = time.perf_counter()
            stats = collect(model, windows, params, mode)
            seconds[mode].append(time.perf_counter() - started)
            print(f"round {round_} {mode}: {seconds[mode][-1]:.1f} s", flush=True)
            if round_ == 0:
                kept[mode] = stats
            del stats
    difference = largest_difference(kept["stored"], kept["second_pass"])
    ratio = seed_ratio(seconds["stored"], seconds["second_pass"])
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Importance statistics: per-window gradients stored or from a second pass",
        "",
        f"Machine: {platform.processor() or platform.machine()}, 2 threads, torch "
        f"{torch.__version__}. Command: `.venv/bin/python "
        f"benchmarks/importance_per_window.py --rounds {args.rounds}` at revision "
        f"`{revision}`; {windows.shape[0]} x {windows.shape[1]} calibration tokens, "
        f"{args.params}'s importance section ({len(params.estimators)} estimators, "
        f"batch {params.batch_size}).",
        "",
        "| per_window | seconds per round | peak RSS (MB; model loaded: before) |",
        "|---|---|---|",
    ]
    for mode in MODES:
        before, peak = peaks[mode]
        lines.append(
            f"| {mode} | {', '.join(f'{s:.1f}' for s in seconds[mode])} | "
            f"{peak:.0f} ({before:.0f}) |"
        )
    lines += [
        "",
        f"- time stored / second_pass, paired by round: **{ratio.value:.3f} "
        f"[{ratio.lower:.3f}, {ratio.upper:.3f}]** (95% t, {args.rounds} rounds, "
        "order reversed every other round)",
        f"- largest relative difference of the Fisher diagonal and the "
        f"leave-one-out atoms between the two: {difference:.1e} (float32 rounding)",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()

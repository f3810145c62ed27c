"""The comparison's report: arm records gathered into rows (means and spreads
over seeds, paired retention intervals against dense, separation from the best
row of each ratio), SAAP's default paired with every baseline over seeds, the
Markdown tables and the plots. The arms themselves are
run by ``stages/compare.py``; the method table is ``saap/methods.py``."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from saap.errors import DataError
from saap.evaluation.intervals import Interval, paired_difference, paired_ratio
from saap.methods import METHODS


def _mean_spread(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def summarise(records: list[dict], resamples: int = 2000) -> list[dict]:
    """One row per (method, ratio, recovery): means and spreads over seeds; the
    first seed's (or the recovered model's) zero-shot retention against dense
    with a paired bootstrap interval, and whether it is separated from the best
    row of its ratio (paired difference interval excluding 0)."""
    dense = next((r for r in records if r["method"] == "dense"), None)
    rows, row_docs = [], []
    for record in sorted(records, key=_order):
        seeds = record["seeds"]
        tasks = list(seeds[0]["acc"])
        kls = [s["kl"]["value"] for s in seeds if s.get("kl")]
        row = {
            "method": record["method"],
            "label": record["label"],
            "ratio": record["ratio"],
            "recovery": None,
            "n_seeds": len(seeds),
            "params": statistics.fmean(s["params"] for s in seeds),
            "ppl": {
                c: _mean_spread([s["ppl"][c] for s in seeds]) for c in seeds[0]["ppl"]
            },
            "acc": {t: _mean_spread([s["acc"][t] for s in seeds]) for t in tasks},
            "metric": seeds[0].get("metric", {}),
            "mean_acc": _mean_spread([s["mean_acc"] for s in seeds]),
            "kl": _mean_spread(kls) if kls else None,
            "prune_s": _mean_spread([s.get("prune_s", 0.0) for s in seeds]),
            "calibration_pass_s": seeds[0].get("calibration_pass_s"),
            "prune_attention": seeds[0].get("prune_attention"),
            "removed_layers": seeds[0].get("removed_layers", []),
            "kept_fraction": seeds[0].get("kept_fraction"),
        }
        bench = record.get("bench")
        if bench and bench.get("speedup_vs_dense"):
            # timed interleaved with dense in the arm's own process
            row["bench_repeats"] = bench.get("repeats")
            row["decode_tokens_per_s"] = bench["decode_tokens_per_s"]
            decode = bench["speedup_vs_dense"]["decode"]
            row["speedup_measured"] = decode["value"]
            row["speedup_interval"] = (decode["lower"], decode["upper"])
            row["speedup_ideal"] = bench["speedup_vs_dense"]["decode_ideal"]
        elif bench and dense and dense.get("bench"):
            # arms gathered before the interleaved timing: over the dense arm's
            # figure, measured in another process
            row["bench_repeats"] = bench.get("repeats")
            row["decode_tokens_per_s"] = bench["decode_tokens_per_s"]
            row["speedup_measured"] = (
                bench["decode_tokens_per_s"] / dense["bench"]["decode_tokens_per_s"]
            )
            row["speedup_ideal"] = (
                dense["bench"]["weight_bytes_per_token"]
                / bench["weight_bytes_per_token"]
            )
        rows.append(row)
        row_docs.append(seeds[0].get("documents"))
        for recovered in record["recovered"]:
            rows.append(
                row
                | {
                    "recovery": recovered["finetune"],
                    "n_seeds": 1,
                    "params": recovered["params"],
                    "ppl": {c: (v, 0.0) for c, v in recovered["ppl"].items()},
                    "acc": {t: (v, 0.0) for t, v in recovered["acc"].items()},
                    "mean_acc": (recovered["mean_acc"], 0.0),
                    "kl": (recovered["kl"]["value"], 0.0)
                    if recovered.get("kl")
                    else None,
                    "finetune_s": recovered["finetune_s"],
                    "tokens": recovered["tokens"],
                }
            )
            row_docs.append(recovered.get("documents"))
    dense_docs = dense["seeds"][0].get("documents") if dense else None
    if dense_docs:
        _add_intervals(rows, row_docs, dense_docs, resamples)
    return rows


def _add_intervals(rows, row_docs, dense_docs, resamples: int) -> None:
    """Retention vs dense and separation from the best row of each ratio."""
    as_arrays = lambda docs: {t: np.asarray(v) for t, v in docs.items()}  # noqa: E731
    dense_arrays = as_arrays(dense_docs)
    for row, docs in zip(rows, row_docs, strict=True):
        if docs:
            row["retention"] = paired_ratio(
                as_arrays(docs), dense_arrays, resamples
            ).as_dict()
    for ratio in {r["ratio"] for r in rows if r["method"] != "dense"}:
        members = [
            i
            for i, r in enumerate(rows)
            if r["ratio"] == ratio and r["method"] != "dense" and row_docs[i]
        ]
        if not members:
            continue
        best = max(members, key=lambda i: rows[i]["mean_acc"][0])
        for i in members:
            if i == best:
                rows[i]["vs_best"] = "best"
                continue
            diff = paired_difference(
                as_arrays(row_docs[i]), as_arrays(row_docs[best]), resamples
            )
            rows[i]["vs_best"] = "below best" if diff.upper < 0 else "not separated"
            rows[i]["vs_best_difference"] = diff.as_dict()


# two-sided 95% quantiles of Student's t by degrees of freedom; above 30 the
# normal quantile 1.960 is within 4% of them
T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
    8: 2.306, 9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042,
}  # fmt: skip


def t95(df: int) -> float:
    """The 95% two-sided t quantile for ``df`` degrees of freedom (the tabulated
    one at or below ``df``: conservative between table entries)."""
    if df < 1:
        raise DataError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df > 30:
        return 1.960
    return T95[max(k for k in T95 if k <= df)]


def seed_ratio(candidate, reference) -> Interval:
    """Ratio of ``candidate`` to ``reference`` paired by seed (e.g. perplexity of
    two methods pruned from the same calibration windows): the geometric mean of
    the per-seed ratios with the 95% t-interval of their mean log. Its spread is
    that of the calibration draw, not of the evaluation documents."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape or len(candidate) < 2:
        raise DataError(
            f"a seed-paired ratio needs the same seeds, at least 2: got "
            f"{len(candidate)} and {len(reference)} values"
        )
    if (candidate <= 0).any() or (reference <= 0).any():
        raise DataError("a seed-paired ratio needs positive values (perplexity, KL)")
    logs = np.log(candidate / reference)
    mean = float(logs.mean())
    half = t95(len(logs) - 1) * float(logs.std(ddof=1)) / len(logs) ** 0.5
    return Interval(
        float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half)),
        0.95, 0, len(logs),
    )  # fmt: skip


SEED_METRICS = {"ptb": "PTB ppl", "wiki": "Wiki ppl", "kl": "KL to dense"}


def _seed_values(record: dict, metric: str) -> dict[int, float]:
    """Per seed, one lower-is-better figure of a pruning-only arm."""
    out = {}
    for seed in record["seeds"]:
        if metric == "kl":
            if seed.get("kl"):
                out[seed["seed"]] = seed["kl"]["value"]
        else:
            out[seed["seed"]] = seed["ppl"][metric]
    return out


def is_baseline(method: str) -> bool:
    """A published method the comparison runs against: not scored by SAAP."""
    return method in METHODS and not METHODS[method].fused


def against_baselines(records: list[dict], default: str) -> list[dict]:
    """SAAP's default arm against every baseline of the same ratio, paired over
    calibration seeds, on PTB and Wikipedia perplexity and KL to dense (all lower
    is better): per metric, each baseline's mean and sd, SAAP / baseline with its
    95% t-interval and a verdict, and which baseline is best. ``margin_over_sd``
    answers the comparison's goal "ahead of the best baseline by more than the
    larger seed sd" (best baseline mean minus SAAP's mean, over the larger sd)."""
    out = []
    for ratio in sorted({r["ratio"] for r in records if r["method"] == default}):
        ours = next(
            r for r in records if r["method"] == default and r["ratio"] == ratio
        )
        baselines = [
            r
            for r in sorted(records, key=_order)
            if r["ratio"] == ratio and is_baseline(r["method"])
        ]
        for metric, name in SEED_METRICS.items():
            mine = _seed_values(ours, metric)
            if len(mine) < 2:
                continue
            entry = {
                "ratio": ratio,
                "metric": metric,
                "name": name,
                "default": default,
                "value": _mean_spread(list(mine.values())),
                "baselines": [],
            }
            for record in baselines:
                theirs = _seed_values(record, metric)
                seeds = sorted(set(mine) & set(theirs))
                if len(seeds) < 2:
                    continue
                ratio_ci = seed_ratio(
                    [mine[s] for s in seeds], [theirs[s] for s in seeds]
                )
                verdict = (
                    "ahead"
                    if ratio_ci.upper < 1
                    else "behind"
                    if ratio_ci.lower > 1
                    else "not separated"
                )
                entry["baselines"].append(
                    {
                        "method": record["method"],
                        "label": record["label"],
                        "value": _mean_spread([theirs[s] for s in seeds]),
                        "ratio": ratio_ci.as_dict(),
                        "verdict": verdict,
                    }
                )
            if not entry["baselines"]:
                continue
            best = min(entry["baselines"], key=lambda b: b["value"][0])
            larger_sd = max(best["value"][1], entry["value"][1])
            entry["best"] = best["method"]
            entry["margin"] = best["value"][0] - entry["value"][0]
            entry["larger_sd"] = larger_sd
            entry["margin_over_sd"] = entry["margin"] > larger_sd
            out.append(entry)
    return out


def baselines_table(entries: list[dict]) -> str:
    """The Markdown of :func:`against_baselines`: one row per ratio, metric and
    baseline, then one goal line per ratio and metric."""
    lines = [
        "| ratio | metric | baseline | baseline mean ± sd | SAAP default / baseline "
        "[95% t over seeds] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    goals = []
    for entry in entries:
        digits = 3 if entry["metric"] == "kl" else 1
        for b in entry["baselines"]:
            r = b["ratio"]
            lines.append(
                f"| {entry['ratio']:.0%} | {entry['name']} | {b['label']} | "
                f"{_pm(b['value'], digits)} | {r['value']:.3f} [{r['lower']:.3f}, "
                f"{r['upper']:.3f}] | {b['verdict']} |"
            )
        best = next(b for b in entry["baselines"] if b["method"] == entry["best"])
        goals.append(
            f"- {entry['ratio']:.0%}, {entry['name']}: SAAP default "
            f"{_pm(entry['value'], digits)}, best baseline {best['label']} "
            f"{_pm(best['value'], digits)} ({best['verdict']}); ahead by "
            f"{entry['margin']:.{digits}f} against the larger seed sd "
            f"{entry['larger_sd']:.{digits}f}: goal "
            + (
                "met"
                if entry["margin_over_sd"] and best["verdict"] == "ahead"
                else "missed"
            )
        )
    return "\n".join(lines + [""] + goals)


def _order(record: dict) -> tuple:
    names = ["dense", *METHODS]
    return (record["ratio"], names.index(record["method"]))


def _pm(value: tuple[float, float], digits: int) -> str:
    mean, spread = value
    if spread == 0.0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def results_table(rows: list[dict]) -> str:
    tasks = list(rows[0]["acc"])
    short = {
        "boolq": "BoolQ",
        "piqa": "PIQA",
        "hellaswag": "HellaS",
        "winogrande": "WinoG",
        "arc_easy": "ARC-e",
        "arc_challenge": "ARC-c",
        "openbookqa": "OBQA",
    }
    head = (
        "| ratio | method | recovery | params (M) | PTB ppl | Wiki ppl | KL to dense | "
        + " | ".join(short.get(t, t) for t in tasks)
        + " | mean score | retention [95% CI] | vs best of ratio "
        "| decode speedup measured / ideal | prune s |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 12)]
    for row in rows:
        speed = "-"
        if "speedup_measured" in row:
            measured = f"{row['speedup_measured']:.2f}"
            if row.get("speedup_interval"):
                low, high = row["speedup_interval"]
                measured += f" [{low:.2f}, {high:.2f}]"
            speed = f"{measured} / {row['speedup_ideal']:.2f}"
        prune_s = "-" if row["method"] == "dense" else f"{row['prune_s'][0]:.1f}"
        kl = _pm(row["kl"], 3) if row.get("kl") else "-"
        retention = row.get("retention")
        retention_text = (
            f"{retention['value']:.3f} [{retention['lower']:.3f}, "
            f"{retention['upper']:.3f}]"
            if retention and row["method"] != "dense"
            else "-"
        )
        lines.append(
            f"| {row['ratio']:.0%} | {row['label']} | {row['recovery'] or '-'} | "
            f"{row['params'] / 1e6:.1f} | {_pm(row['ppl']['ptb'], 1)} | "
            f"{_pm(row['ppl']['wiki'], 1)} | {kl} | "
            + " | ".join(_pm(row["acc"][t], 3) for t in tasks)
            + f" | {_pm(row['mean_acc'], 3)} | {retention_text} | "
            f"{row.get('vs_best', '-')} | {speed} | {prune_s} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {None: "o", "lora": "^", "group": "s"}
    colours = {}
    for row in rows:
        colour = colours.setdefault(row["label"], f"C{len(colours) % 10}")
        mean, spread = row["mean_acc"]
        ax.errorbar(
            row["params"] / 1e6,
            mean,
            yerr=spread or None,
            fmt=markers[row["recovery"]],
            color=colour,
            label=row["label"] if row["recovery"] is None else None,
            capsize=2,
        )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("mean zero-shot accuracy (7 tasks)")
    ax.set_title("o pruned (mean ± std over seeds), ^ + LoRA, s + group")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_kept_fraction_per_method(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(6 * len(ratios), 4), squeeze=False
    )
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for row in rows:
            if row["ratio"] != ratio or row["recovery"] or not row["kept_fraction"]:
                continue
            ax.plot(row["kept_fraction"], marker=".", label=row["label"])
        ax.set_title(f"{ratio:.0%} of parameters removed (first seed)")
        ax.set_xlabel("layer")
        ax.set_ylabel("kept fraction of the layer's parameters")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)

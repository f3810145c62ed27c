"""Confidence intervals by seeded (paired) bootstrap: plain tensor functions.

Every figure a gate reads comes with a 95% percentile interval. Paired
comparisons resample the *same* documents (or text windows) for both models, so
the shared difficulty of a document cancels and the interval reflects only how
the two models differ on it. Zero-shot documents are resampled within each task
(a stratified bootstrap), so every resample keeps the tasks' sizes and the
macro mean over tasks stays the statistic that is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from saap.errors import DataError

DEFAULT_RESAMPLES = 2000
# resampled index matrices are built in chunks of this many resamples, so a
# 10,000-document task costs ~20 MB at a time, not ~160 MB
_CHUNK = 250


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its percentile interval."""

    value: float
    lower: float
    upper: float
    level: float = 0.95
    resamples: int = DEFAULT_RESAMPLES
    n: int = 0

    @property
    def half_width(self) -> float:
        return (self.upper - self.lower) / 2

    def as_dict(self) -> dict:
        return asdict(self) | {"half_width": self.half_width}


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lower, upper = np.percentile(samples, [tail, 100 - tail])
    return float(lower), float(upper)


def stratified_means(
    groups: Mapping[str, np.ndarray], resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """``(resamples, columns)`` means of each group's rows, resampled with the
    same seeded indices for every column of a group.

    ``groups[name]`` is ``(n_docs, columns)``: one row per document, one column
    per model (or per metric). Returns ``(resamples, columns)`` per group.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in sorted(groups):  # fixed order: the result depends on the seed only
        values = np.asarray(groups[name], dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        n = values.shape[0]
        if n == 0:
            raise DataError(f"group {name!r} has no documents to resample")
        chunks = []
        for start in range(0, resamples, _CHUNK):
            size = min(_CHUNK, resamples - start)
            index = rng.integers(0, n, size=(size, n), dtype=np.int32)
            chunks.append(values[index].mean(axis=1))  # (size, columns)
        out[name] = np.concatenate(chunks)
    return out


def bootstrap(
    groups: Mapping[str, np.ndarray],
    statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Interval of ``statistic`` over stratified resamples of ``groups``.

    ``statistic`` maps per-group column means (arrays of shape ``(k, columns)``)
    to ``(k,)`` values; it is applied once to the observed means (k = 1) and once
    to all the resampled ones.
    """
    observed = {
        name: np.asarray(values, dtype=np.float64)
        .reshape(len(values), -1)
        .mean(0)[None]
        for name, values in groups.items()
    }
    point = float(statistic(observed)[0])
    samples = statistic(stratified_means(groups, resamples, seed))
    lower, upper = _bounds(np.asarray(samples, dtype=np.float64), level)
    n = sum(len(v) for v in groups.values())
    return Interval(point, lower, upper, level, resamples, n)


def macro_mean(means: dict[str, np.ndarray], column: int = 0) -> np.ndarray:
    """Mean over tasks of a column of the per-task means: ``(k,)``."""
    return np.mean([m[:, column] for m in means.values()], axis=0)


def paired_ratio(
    candidate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Macro-mean of ``candidate`` / macro-mean of ``reference`` (retention), on
    the same documents of each task, paired."""
    groups = _paired(candidate, reference)

    def ratio(means: dict[str, np.ndarray]) -> np.ndarray:
        return macro_mean(means, 0) / macro_mean(means, 1)

    return bootstrap(groups, ratio, resamples, seed)


def paired_difference(
    candidate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Macro-mean of ``candidate`` minus that of ``reference``, paired."""
    groups = _paired(candidate, reference)

    def difference(means: dict[str, np.ndarray]) -> np.ndarray:
        return macro_mean(means, 0) - macro_mean(means, 1)

    return bootstrap(groups, difference, resamples, seed)


def mean_interval(
    values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Interval:
    """Mean of ``values`` (e.g. per-window KL) with its bootstrap interval."""
    return bootstrap(
        {"values": np.asarray(values)}, lambda m: m["values"][:, 0], resamples, seed
    )


def perplexity_ratio(
    candidate_nll: np.ndarray,
    reference_nll: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """exp(mean NLL of candidate - mean NLL of reference) over the same windows
    (per-window mean NLL per token; windows have equal length), paired."""
    if len(candidate_nll) != len(reference_nll):
        raise DataError(
            f"perplexity ratio needs the same windows: {len(candidate_nll)} against "
            f"{len(reference_nll)}; evaluate both with the same evaluate settings"
        )
    groups = {"windows": np.stack([candidate_nll, reference_nll], axis=1)}
    return bootstrap(
        groups,
        lambda m: np.exp(m["windows"][:, 0] - m["windows"][:, 1]),
        resamples,
        seed,
    )


def paired_speedup(
    candidate: np.ndarray,
    reference: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Speedup of interleaved timing repeats (tokens/s of candidate over
    reference, round by round), with a bootstrap over the rounds. A round's two
    timings share the machine's state (clock, cache, neighbours), so its ratio
    cancels what drifts between rounds.

    The location is the median of the per-round log-ratios, not their mean: a
    run of under a second that another process interrupts gives one wild
    round, which moves a mean (and made repeated gate verdicts disagree,
    docs/bench_gates.md) but hardly a median; its bootstrap interval widens
    only when many rounds are hit. On clean rounds the two agree closely.
    """
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if len(candidate) != len(reference) or len(candidate) < 2:
        raise DataError(
            f"a speedup interval needs at least 2 paired repeats, got "
            f"{len(candidate)} and {len(reference)}"
        )
    log_ratio = np.log(candidate / reference)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(log_ratio), size=(resamples, len(log_ratio)))
    samples = np.exp(np.median(log_ratio[index], axis=1))
    lower, upper = _bounds(samples, 0.95)
    point = float(np.exp(np.median(log_ratio)))
    return Interval(point, lower, upper, 0.95, resamples, len(candidate))


def _paired(
    candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    if set(candidate) != set(reference):
        raise DataError(
            f"paired comparison needs the same tasks: {sorted(candidate)} against "
            f"{sorted(reference)}"
        )
    groups = {}
    for task in candidate:
        c, r = np.asarray(candidate[task]), np.asarray(reference[task])
        if c.shape != r.shape:
            raise DataError(
                f"paired comparison needs the same documents of {task}: "
                f"{len(c)} against {len(r)}; evaluate both with the same config"
            )
        groups[task] = np.stack([c, r], axis=1)
    return groups

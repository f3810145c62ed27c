"""Promotion gates: pure verdicts from a candidate's metrics, the dense model's
and (if any) the current champion's.

Gates (thresholds in ``params.yaml``, section ``gates``):

- ``accuracy_retention``: candidate mean zero-shot accuracy / dense >= minimum;
- ``ppl_ratio``: candidate perplexity / dense (on ``gates.ppl_corpus``) <= maximum;
- ``decode_speedup``: candidate decode tokens/s / dense >= minimum;
- ``no_regression``: against the current champion, mean accuracy not lower by
  more than ``champion_tolerance`` and no more parameters (passes when there is
  no champion yet).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from saap.params import GatesParams


@dataclass(frozen=True)
class GateResult:
    """One gate's measured value, its threshold and the verdict."""

    name: str
    value: float | None
    threshold: float
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(
    candidate: dict, dense: dict, params: GatesParams, champion: dict | None = None
) -> list[GateResult]:
    """Verdicts for ``candidate`` = ``{"eval": ..., "bench": ...}`` metric dicts."""
    corpus = params.ppl_corpus
    retention = candidate["eval"]["mean_acc"] / dense["eval"]["mean_acc"]
    ppl_ratio = (
        candidate["eval"]["perplexity"][corpus] / dense["eval"]["perplexity"][corpus]
    )
    speedup = (
        candidate["bench"]["decode_tokens_per_s"]
        / dense["bench"]["decode_tokens_per_s"]
    )
    results = [
        GateResult(
            "accuracy_retention",
            retention,
            params.min_accuracy_retention,
            retention >= params.min_accuracy_retention,
            "mean zero-shot accuracy / dense",
        ),
        GateResult(
            "ppl_ratio",
            ppl_ratio,
            params.max_ppl_ratio,
            ppl_ratio <= params.max_ppl_ratio,
            f"{corpus} perplexity / dense",
        ),
        GateResult(
            "decode_speedup",
            speedup,
            params.min_decode_speedup,
            speedup >= params.min_decode_speedup,
            "decode tokens/s / dense (batch 1)",
        ),
    ]
    if champion is None:
        results.append(
            GateResult(
                "no_regression",
                None,
                params.champion_tolerance,
                True,
                "no champion yet",
            )
        )
    else:
        drop = champion["eval"]["mean_acc"] - candidate["eval"]["mean_acc"]
        smaller = candidate["eval"]["params"] <= champion["eval"]["params"]
        results.append(
            GateResult(
                "no_regression",
                drop,
                params.champion_tolerance,
                drop <= params.champion_tolerance and smaller,
                "champion mean accuracy - candidate's; candidate params <= champion's",
            )
        )
    return results

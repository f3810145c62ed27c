"""Promotion gates: verdicts with intervals from a candidate's evaluation, the
dense model's and (if any) the current champion's.

Each gate records its value, the bounds of its 95% interval, the threshold and
the verdict. An "at least" gate that *decides* passes only when its lower bound
clears the threshold, an "at most" gate only when its upper bound does. A gate
that blocks only *clear damage* (accuracy in the quick profile, where a few
hundred documents give intervals of about +-0.1) fails only when the whole
interval lies on the wrong side. A gate whose inputs are missing, or that would
compare evaluations made with different configs, fails closed with the reason.

Gates (thresholds in ``params.yaml``, section ``gates``):

- ``accuracy_retention``: macro-mean zero-shot score (acc_norm where the task
  has it) of candidate / dense, paired bootstrap over the same documents;
- ``ppl_ratio``: perplexity of candidate / dense on ``gates.ppl_corpus``,
  paired over the same windows; fails closed where that corpus is in-domain for
  the candidate (its recovery trained on the corpus's own domain, e.g. PTB with
  ``finetune.kd_corpora: ptb_train``): such a perplexity cannot show damage;
- ``fidelity_kl``: mean KL(dense || candidate) per token on held-back text;
- ``decode_speedup``: decode tokens/s of candidate / dense in llama.cpp (the GGUF
  type ``gates.speed_gguf_type``), the two files run interleaved;
- ``no_regression``: against the champion, the paired accuracy difference
  (at least ``-champion_tolerance``) and the paired perplexity ratio (at most
  ``1 + champion_ppl_tolerance``), no more parameters; passes with no champion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from saap.evaluation.intervals import Interval, paired_difference, paired_ratio
from saap.evaluation.intervals import perplexity_ratio as ppl_ratio_interval
from saap.params import GatesParams

Direction = Literal["at_least", "at_most"]
Mode = Literal["decides", "damage_only"]


@dataclass(frozen=True)
class GateResult:
    """One gate's value, interval, threshold and verdict."""

    name: str
    value: float | None
    lower: float | None
    upper: float | None
    threshold: float
    direction: Direction
    mode: Mode
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(interval: Interval, threshold: float, direction: Direction, mode: Mode):
    """Pass or fail from the interval's bounds (see the module docstring)."""
    if direction == "at_least":
        bound = interval.lower if mode == "decides" else interval.upper
        return bound >= threshold
    bound = interval.upper if mode == "decides" else interval.lower
    return bound <= threshold


def gate(
    name: str,
    interval: Interval | None,
    threshold: float,
    direction: Direction,
    mode: Mode,
    detail: str,
) -> GateResult:
    if interval is None:
        return GateResult(
            name, None, None, None, threshold, direction, mode, False, detail
        )
    return GateResult(
        name,
        interval.value,
        interval.lower,
        interval.upper,
        threshold,
        direction,
        mode,
        bool(verdict(interval, threshold, direction, mode)),
        detail,
    )


def failed(name: str, threshold: float, direction: Direction, reason: str):
    """A gate that cannot be computed: fails closed, saying why."""
    return GateResult(
        name, None, None, None, threshold, direction, "decides", False, reason
    )


def reported_documents(evidence: dict) -> dict[str, np.ndarray]:
    """Per task, the per-document values of the metric the mean reports."""
    scores = evidence["eval"]["zero_shot"]
    documents = evidence["documents"]["zero_shot"]
    return {
        task: np.asarray(documents[task][scores[task]["metric"]])
        for task in sorted(scores)
    }


def same_config(a: dict, b: dict) -> bool:
    return a["eval"].get("eval_config_hash") == b["eval"].get("eval_config_hash")


def accuracy_mode(params: GatesParams, profile: str) -> Mode:
    return "decides" if profile in params.accuracy_decides_in else "damage_only"


def evaluate_gates(
    candidate: dict,
    dense: dict,
    params: GatesParams,
    champion: dict | None = None,
) -> list[GateResult]:
    """Verdicts for ``candidate`` = ``{"eval", "documents", "bench"}`` dicts (the
    JSON the evaluate and bench stages write); ``dense`` and ``champion`` alike
    (bench is not read from them)."""
    resamples = candidate["eval"].get("resamples", 2000)
    seed = candidate["eval"].get("seed", 0)
    profile = candidate["eval"].get("profile", "quick")
    mode = accuracy_mode(params, profile)
    results: list[GateResult] = []

    if not same_config(candidate, dense):
        reason = (
            "candidate and dense were evaluated with different configs "
            f"({candidate['eval'].get('eval_config_hash')} vs "
            f"{dense['eval'].get('eval_config_hash')}); re-run evaluate for both"
        )
        for name, threshold, direction in (
            ("accuracy_retention", params.min_accuracy_retention, "at_least"),
            ("ppl_ratio", params.max_ppl_ratio, "at_most"),
        ):
            results.append(failed(name, threshold, direction, reason))
    else:
        results.append(_accuracy_gate(candidate, dense, params, mode, resamples, seed))
        results.append(_ppl_gate(candidate, dense, params, resamples, seed))
    results.append(_fidelity_gate(candidate, params))
    results.append(_speed_gate(candidate, params))
    results.append(_champion_gate(candidate, champion, params, mode, resamples, seed))
    return results


def _accuracy_gate(candidate, dense, params, mode, resamples, seed) -> GateResult:
    name, threshold = "accuracy_retention", params.min_accuracy_retention
    try:
        interval = paired_ratio(
            reported_documents(candidate), reported_documents(dense), resamples, seed
        )
    except (KeyError, ValueError) as exc:
        return failed(name, threshold, "at_least", f"no per-document results: {exc}")
    detail = "macro-mean zero-shot score (acc_norm where defined) / dense, paired"
    result = gate(name, interval, threshold, "at_least", mode, detail)
    if mode == "decides" and interval.half_width > params.max_half_width:
        return replace(
            result,
            passed=False,
            detail=f"{detail}; interval half-width {interval.half_width:.3f} is "
            f"over {params.max_half_width} (too few documents to decide)",
        )
    return result


def in_domain_reason(entry: dict, corpus: str, who: str) -> str | None:
    """Why ``corpus`` cannot judge ``entry`` (None where it can): the entry's
    evaluation records it as in-domain (trained on that corpus's domain)."""
    if corpus not in (entry["eval"].get("in_domain") or []):
        return None
    return (
        f"{corpus} is in-domain for the {who} (its recovery trained on {corpus}'s "
        f"own domain: finetune.kd_corpora), so its {corpus} perplexity cannot show "
        "damage; set gates.ppl_corpus to a corpus it did not train on (wiki or "
        f"c4), or leave the {corpus} train split out of finetune.kd_corpora"
    )


def _ppl_gate(candidate, dense, params, resamples, seed) -> GateResult:
    name, threshold, corpus = "ppl_ratio", params.max_ppl_ratio, params.ppl_corpus
    if reason := in_domain_reason(candidate, corpus, "candidate"):
        return failed(name, threshold, "at_most", reason)
    try:
        interval = ppl_ratio_interval(
            np.asarray(candidate["documents"]["perplexity"][corpus]),
            np.asarray(dense["documents"]["perplexity"][corpus]),
            resamples,
            seed,
        )
    except KeyError:
        return failed(
            name, threshold, "at_most", f"no per-window {corpus} results to compare"
        )
    return gate(
        name, interval, threshold, "at_most", "decides", f"{corpus} perplexity / dense"
    )


def _fidelity_gate(candidate, params) -> GateResult:
    name, threshold = "fidelity_kl", params.max_kl
    fid = candidate["eval"].get("fidelity")
    if not fid:
        return failed(name, threshold, "at_most", "no fidelity measured (no --dense)")
    interval = Interval(**{k: fid["kl"][k] for k in ("value", "lower", "upper")})
    return gate(
        name,
        interval,
        threshold,
        "at_most",
        "decides",
        f"mean KL(dense || candidate) per token, {fid['windows']} held-back "
        f"{fid['corpus']} windows",
    )


def _speed_gate(candidate, params) -> GateResult:
    name, threshold = "decode_speedup", params.min_decode_speedup
    kind = params.speed_gguf_type
    runtime = (candidate.get("bench") or {}).get("llamacpp") or {}
    entry = (runtime.get("types") or {}).get(kind) or {}
    decode = (entry.get("speedup") or {}).get("decode")
    if not decode:
        return failed(
            name,
            threshold,
            "at_least",
            f"no interleaved llama.cpp timing of the {kind} GGUF against dense; run "
            "the export stages and bench with --gguf and --dense-gguf",
        )
    interval = Interval(**{k: decode[k] for k in ("value", "lower", "upper")})
    return gate(
        name,
        interval,
        threshold,
        "at_least",
        "decides",
        f"decode tokens/s / dense, llama.cpp {kind} GGUF, batch 1, "
        f"{runtime.get('threads', '?')} threads, {decode.get('n', '?')} interleaved "
        f"repeats (ideal {entry.get('decode_ideal', float('nan')):.3f})",
    )


def _champion_gate(candidate, champion, params, mode, resamples, seed) -> GateResult:
    name, threshold = "no_regression", -params.champion_tolerance
    if champion is None:
        return GateResult(
            name, None, None, None, threshold, "at_least", mode, True, "no champion"
        )
    if not same_config(candidate, champion):
        return failed(
            name,
            threshold,
            "at_least",
            "the champion was evaluated with another config or data (eval-config "
            f"hash {champion['eval'].get('eval_config_hash')} vs "
            f"{candidate['eval'].get('eval_config_hash')}); re-evaluate it with this "
            "config, or promote explicitly",
        )
    for entry, who in ((candidate, "candidate"), (champion, "champion")):
        if reason := in_domain_reason(entry, params.ppl_corpus, who):
            return failed(name, threshold, "at_least", reason)
    try:
        accuracy = paired_difference(
            reported_documents(candidate),
            reported_documents(champion),
            resamples,
            seed,
        )
        corpus = params.ppl_corpus
        ppl = ppl_ratio_interval(
            np.asarray(candidate["documents"]["perplexity"][corpus]),
            np.asarray(champion["documents"]["perplexity"][corpus]),
            resamples,
            seed,
        )
    except (KeyError, ValueError) as exc:
        return failed(name, threshold, "at_least", f"champion results missing: {exc}")
    accuracy_ok = verdict(accuracy, threshold, "at_least", mode)
    ppl_limit = 1.0 + params.champion_ppl_tolerance
    ppl_ok = verdict(ppl, ppl_limit, "at_most", "decides")
    smaller = candidate["eval"]["params"] <= champion["eval"]["params"]
    return GateResult(
        name,
        accuracy.value,
        accuracy.lower,
        accuracy.upper,
        threshold,
        "at_least",
        mode,
        bool(accuracy_ok and ppl_ok and smaller),
        f"accuracy - champion's (paired); {params.ppl_corpus} perplexity / "
        f"champion's {ppl.value:.4f} [{ppl.lower:.4f}, {ppl.upper:.4f}] at most "
        f"{ppl_limit} ({'ok' if ppl_ok else 'FAIL'}); params "
        f"{candidate['eval']['params']} <= {champion['eval']['params']} "
        f"({'ok' if smaller else 'FAIL'})",
    )

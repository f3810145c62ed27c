"""The importance artifact: every estimator's group scores, their jackknife
replicates, and the statistics the ranking and pruning need, saved as one
safetensors file plus ``meta.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saap.errors import DataError
from saap.importance import CalibrationStats, estimate
from saap.importance.estimators import (
    ESTIMATORS,
    jackknife_names,
    jackknife_replicates,
    with_fusion_inputs,
)

# the layer ranking's importance-fluctuation indicator reads its per-batch scores
FLUCTUATION_METRIC = "taylor_element1"


@dataclass
class ImportanceScores:
    """Group scores per estimator and layer, with the calibration side data."""

    scores: dict[str, list[dict[str, torch.Tensor]]]
    # per-batch scores of FLUCTUATION_METRIC (the layer ranking's indicator)
    batch_scores: dict[str, list[dict[str, torch.Tensor]]]
    input_means: list[dict[str, torch.Tensor]]
    block_influence: torch.Tensor
    meta: dict
    # leave-one-window-out scores {kind: (windows, n)} per layer, per estimator
    replicates: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.input_means)

    def estimator(self, name: str) -> list[dict[str, torch.Tensor]]:
        """Scores of estimator ``name`` per layer (a derived one is computed)."""
        return self.estimate(name)[0]

    def estimate(
        self, name: str, metrics: list[str] | tuple[str, ...] | None = None
    ) -> tuple[list[dict[str, torch.Tensor]], dict]:
        """Scores of estimator ``name`` per layer and its details (a derived
        estimator's, e.g. SAAP's sigmas; empty for a base one). ``metrics``: what a
        derived estimator fuses (default: its registered inputs)."""
        spec = ESTIMATORS.get(name) if name in ESTIMATORS else None
        if spec is not None and spec.derived:
            metrics = tuple(metrics or spec.inputs)
            missing = [
                m for m in metrics if m not in self.scores or m not in self.replicates
            ]
            if missing:
                raise DataError(
                    f"estimator {name!r} fuses {list(metrics)} but the importance "
                    f"scores lack the scores or jackknife replicates of {missing}; "
                    "add them to importance.estimators and importance.jackknife "
                    "(only estimators with replicates can be fused)"
                )
            return spec.score(self, metrics)
        if name not in self.scores:
            raise DataError(
                f"importance scores hold no estimator {name!r}; available: "
                f"{[*self.derived_available(), *sorted(self.scores)]}; add it to "
                "importance.estimators"
            )
        return self.scores[name], {}

    def derived_available(self) -> list[str]:
        return [
            n
            for n, spec in ESTIMATORS.items()
            if spec.derived and all(m in self.replicates for m in spec.inputs)
        ]

    def fluctuation(self) -> torch.Tensor:
        """Importance-fluctuation indicator per layer: coefficient of variation over
        calibration batches of the layer's total element-wise Taylor importance."""
        values = []
        for layer in self.batch_scores[FLUCTUATION_METRIC]:
            totals = layer["mlp"].sum(1) + layer["q_head"].sum(1)  # (B,)
            values.append(float(totals.std() / totals.mean().clamp_min(1e-12)))
        return torch.tensor(values)


def scores_from_stats(
    stats: CalibrationStats,
    estimators: list[str],
    seed: int,
    meta: dict,
    jackknife: list[str] | None = None,
) -> ImportanceScores:
    """Run the estimators on collected statistics (the default inputs of derived
    estimators always included), with the jackknife replicates of those that give
    them (when the per-window pass ran), or only of those in ``jackknife``."""
    estimators = with_fusion_inputs(list(estimators))
    return ImportanceScores(
        scores=estimate(stats, list(estimators), seed),
        batch_scores={
            FLUCTUATION_METRIC: [
                stats.batch_scores(i) for i in range(len(stats.layers))
            ]
        },
        input_means=[
            {"o": stats.input_mean(i, "o"), "down": stats.input_mean(i, "down")}
            for i in range(len(stats.layers))
        ],
        block_influence=stats.block_influence(),
        meta=meta,
        replicates=jackknife_replicates(
            stats, jackknife_names(list(estimators), jackknife)
        ),
    )


def save_scores(scores: ImportanceScores, out_dir: Path) -> None:
    """Write ``scores.safetensors`` and ``meta.json`` into ``out_dir``."""
    tensors: dict[str, torch.Tensor] = {"block_influence": scores.block_influence}
    for name, layers in scores.scores.items():
        for index, layer in enumerate(layers):
            for kind, values in layer.items():
                tensors[f"score/{name}/{index}/{kind}"] = values.float().contiguous()
    for prefix, table in (("batch", scores.batch_scores), ("jack", scores.replicates)):
        for name, layers in table.items():
            for index, layer in enumerate(layers):
                for kind, values in layer.items():
                    key = f"{prefix}/{name}/{index}/{kind}"
                    tensors[key] = values.float().contiguous()
    for index, means in enumerate(scores.input_means):
        for which, values in means.items():
            tensors[f"input_mean/{index}/{which}"] = values.float().contiguous()
    save_file(tensors, str(out_dir / "scores.safetensors"))
    (out_dir / "meta.json").write_text(json.dumps(scores.meta, indent=2) + "\n")


def load_scores(in_dir: Path) -> ImportanceScores:
    """Read what :func:`save_scores` wrote."""
    path = Path(in_dir) / "scores.safetensors"
    if not path.is_file():
        raise DataError(f"{path} is missing; the importance stage writes it")
    tensors = load_file(str(path))
    meta = json.loads((Path(in_dir) / "meta.json").read_text())
    num_layers = int(meta["num_layers"])

    def nested(prefix: str) -> dict[str, list[dict[str, torch.Tensor]]]:
        out: dict[str, list[dict[str, torch.Tensor]]] = {}
        for key, values in tensors.items():
            if key.startswith(prefix + "/"):
                _, name, index, kind = key.split("/")
                layers = out.setdefault(name, [{} for _ in range(num_layers)])
                layers[int(index)][kind] = values
        return out

    input_means: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for key, values in tensors.items():
        if key.startswith("input_mean/"):
            _, index, which = key.split("/")
            input_means[int(index)][which] = values
    return ImportanceScores(
        scores=nested("score"),
        batch_scores=nested("batch"),
        replicates=nested("jack"),
        input_means=input_means,
        block_influence=tensors["block_influence"],
        meta=meta,
    )

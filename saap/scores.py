"""The importance artifact: every estimator's group scores and the statistics the
ranking and pruning need, saved as one safetensors file plus ``meta.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saap.errors import DataError
from saap.fusion import fuse, metric_sigma
from saap.importance import CalibrationStats, estimate

FUSED_METRICS = ("taylor_vector", "taylor_element1")
KINDS = ("q_head", "kv_group", "mlp")


@dataclass
class ImportanceScores:
    """Group scores per estimator and layer, with the calibration side data."""

    scores: dict[str, list[dict[str, torch.Tensor]]]
    batch_scores: dict[str, list[dict[str, torch.Tensor]]]
    input_means: list[dict[str, torch.Tensor]]
    block_influence: torch.Tensor
    meta: dict

    @property
    def num_layers(self) -> int:
        return len(self.input_means)

    def estimator(self, name: str) -> list[dict[str, torch.Tensor]]:
        """Scores of estimator ``name``, or the SAAP fusion for ``saap``."""
        if name == "saap":
            return self.fused()[0]
        if name not in self.scores:
            raise DataError(
                f"importance scores hold no estimator {name!r}; available: "
                f"{['saap', *sorted(self.scores)]}; add it to importance.estimators"
            )
        return self.scores[name]

    def sigmas(self) -> dict[str, dict[str, float]]:
        """Per kind, the uncertainty sigma of each fused metric over all layers."""
        result: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            result[kind] = {
                metric: metric_sigma(
                    torch.cat(
                        [layer[kind] for layer in self.batch_scores[metric]], dim=1
                    )
                )
                for metric in FUSED_METRICS
            }
        return result

    def fused(
        self,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
        """SAAP fused scores per layer and kind, and the sigmas used."""
        sigmas = self.sigmas()
        fused_layers: list[dict[str, torch.Tensor]] = [
            {} for _ in range(self.num_layers)
        ]
        for kind in KINDS:
            sizes = [layer[kind].numel() for layer in self.scores[FUSED_METRICS[0]]]
            observed = {
                m: torch.cat([layer[kind] for layer in self.scores[m]])
                for m in FUSED_METRICS
            }
            for index, part in enumerate(
                torch.split(fuse(observed, sigmas[kind]), sizes)
            ):
                fused_layers[index][kind] = part
        return fused_layers, sigmas

    def fluctuation(self) -> torch.Tensor:
        """Importance-fluctuation indicator per layer: coefficient of variation over
        calibration batches of the layer's total element-wise Taylor importance."""
        values = []
        for layer in self.batch_scores["taylor_element1"]:
            totals = layer["mlp"].sum(1) + layer["q_head"].sum(1)  # (B,)
            values.append(float(totals.std() / totals.mean().clamp_min(1e-12)))
        return torch.tensor(values)


def scores_from_stats(
    stats: CalibrationStats, estimators: list[str], seed: int, meta: dict
) -> ImportanceScores:
    """Run the estimators on collected statistics (fused metrics always included)."""
    names = list(dict.fromkeys([*FUSED_METRICS, *estimators]))
    return ImportanceScores(
        scores=estimate(stats, names, seed),
        batch_scores={
            m: [stats.batch_scores(i, m) for i in range(len(stats.layers))]
            for m in FUSED_METRICS
        },
        input_means=[
            {"o": stats.input_mean(i, "o"), "down": stats.input_mean(i, "down")}
            for i in range(len(stats.layers))
        ],
        block_influence=stats.block_influence(),
        meta=meta,
    )


def save_scores(scores: ImportanceScores, out_dir: Path) -> None:
    """Write ``scores.safetensors`` and ``meta.json`` into ``out_dir``."""
    tensors: dict[str, torch.Tensor] = {"block_influence": scores.block_influence}
    for name, layers in scores.scores.items():
        for index, layer in enumerate(layers):
            for kind, values in layer.items():
                tensors[f"score/{name}/{index}/{kind}"] = values.float().contiguous()
    for name, layers in scores.batch_scores.items():
        for index, layer in enumerate(layers):
            for kind, values in layer.items():
                tensors[f"batch/{name}/{index}/{kind}"] = values.float().contiguous()
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
        input_means=input_means,
        block_influence=tensors["block_influence"],
        meta=meta,
    )

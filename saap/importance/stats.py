"""Calibration statistics gathered in explicit accumulators, batch by batch.

One pass over the calibration windows collects, per decoder layer:

- the summed gradient of every projection (kept in ``.grad`` itself, which
  autograd accumulates across batches: no extra copy);
- the Fisher diagonal (sum of squared per-batch gradients) when a second-order
  estimator needs it: one extra float32 copy of the layer weights;
- per-batch vector-wise and element-wise Taylor group scores (tiny), from
  gradient hooks that see each batch's gradient before it is accumulated; their
  spread over batches is the uncertainty the SAAP fusion uses;
- sums of the inputs of o_proj and down_proj and of their squares (float64) for
  FLAP's fluctuation, Wanda-sp's input norms and FLAP's bias compensation;
- the block influence ``1 - cos(h_in, h_out)`` of each layer (ShortGPT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.importance.taylor import atom_sums, groups_from_atoms
from saap.model import LayerShape, decoder_layers, layer_shapes

log = logging.getLogger(__name__)


def layer_projections(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable parameters of one decoder layer by short name."""
    attn, mlp = layer.self_attn, layer.mlp
    params = {
        "q": attn.q_proj.weight,
        "k": attn.k_proj.weight,
        "v": attn.v_proj.weight,
        "o": attn.o_proj.weight,
        "gate": mlp.gate_proj.weight,
        "up": mlp.up_proj.weight,
        "down": mlp.down_proj.weight,
    }
    if attn.q_proj.bias is not None:
        params.update(
            q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias
        )
    return params


@dataclass
class LayerStats:
    """Accumulators of one decoder layer."""

    shape: LayerShape
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    o_in_sum: torch.Tensor | None = None
    o_in_sq: torch.Tensor | None = None
    down_in_sum: torch.Tensor | None = None
    down_in_sq: torch.Tensor | None = None
    tokens: int = 0
    influence_sum: float = 0.0
    # per batch: atom -> signed sum of W*g (vector) / sum |W*g| (element)
    batch_vector_atoms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    batch_element_atoms: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def add_input(self, which: str, x: torch.Tensor) -> None:
        """Add the (tokens, channels) input of o_proj or down_proj."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        total, squares = x.sum(0), x.square().sum(0)
        if which == "o":
            self.o_in_sum = total if self.o_in_sum is None else self.o_in_sum + total
            self.o_in_sq = squares if self.o_in_sq is None else self.o_in_sq + squares
            self.tokens += x.shape[0]
        else:
            self.down_in_sum = (
                total if self.down_in_sum is None else self.down_in_sum + total
            )
            self.down_in_sq = (
                squares if self.down_in_sq is None else self.down_in_sq + squares
            )


@dataclass
class CalibrationStats:
    """Everything the estimators need, for every decoder layer."""

    layers: list[LayerStats]
    grads: list[dict[str, torch.Tensor]]
    weights: list[dict[str, torch.Tensor]]
    num_batches: int
    num_tokens: int
    losses: list[float]

    def input_mean(self, index: int, which: str) -> torch.Tensor:
        """Mean input of o_proj (``o``) or down_proj (``down``) of a layer."""
        stats = self.layers[index]
        total = stats.o_in_sum if which == "o" else stats.down_in_sum
        return (total / max(stats.tokens, 1)).float()

    def input_variance(self, index: int, which: str) -> torch.Tensor:
        """Per-channel variance of the input over calibration tokens."""
        stats = self.layers[index]
        n = max(stats.tokens, 1)
        total, squares = (
            (stats.o_in_sum, stats.o_in_sq)
            if which == "o"
            else (stats.down_in_sum, stats.down_in_sq)
        )
        mean = total / n
        return (squares / n - mean.square()).clamp_min(0).float()

    def input_norm(self, index: int, which: str) -> torch.Tensor:
        """Per-channel L2 norm of the input over calibration tokens."""
        stats = self.layers[index]
        squares = stats.o_in_sq if which == "o" else stats.down_in_sq
        return squares.sqrt().float()

    def batch_scores(self, index: int, metric: str) -> dict[str, torch.Tensor]:
        """Per-batch group scores (B, n) of ``taylor_vector`` or ``taylor_element1``."""
        stats = self.layers[index]
        if metric == "taylor_vector":
            atoms, finish = stats.batch_vector_atoms, torch.abs
        else:
            atoms, finish = stats.batch_element_atoms, (lambda x: x)
        per_batch = [
            groups_from_atoms(a, stats.shape.num_kv_heads, finish) for a in atoms
        ]
        return {
            kind: torch.stack([b[kind] for b in per_batch]) for kind in per_batch[0]
        }

    def block_influence(self) -> torch.Tensor:
        """Mean ``1 - cos(h_in, h_out)`` per layer, (L,)."""
        return torch.tensor([s.influence_sum / max(s.tokens, 1) for s in self.layers])


def _grad_hook(
    stats: LayerStats,
    batch: list[int],
    name: str,
    weight: torch.Tensor,
    head_dim: int,
    want_fisher: bool,
):
    def hook(grad: torch.Tensor) -> None:
        index = batch[0]
        product = weight.detach() * grad  # this batch's W*g, before accumulation
        for bucket, values in (
            (stats.batch_vector_atoms, product),
            (stats.batch_element_atoms, product.abs()),
        ):
            atom, sums = atom_sums(name, values, head_dim)
            slot = bucket[index]
            slot[atom] = slot[atom] + sums if atom in slot else sums
        if want_fisher:
            square = grad.square()
            if name in stats.fisher:
                stats.fisher[name] += square
            else:
                stats.fisher[name] = square.clone()

    return hook


def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    want_fisher: bool = True,
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration ``windows`` (N, T) through ``model`` (float32) once.

    Gradients are of the mean next-token loss of each batch; ``.grad`` ends up
    holding their sum over batches, which is divided by the number of batches.
    """
    shapes = layer_shapes(model)
    layers = decoder_layers(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    layer_stats = [LayerStats(shape=shape) for shape in shapes]
    batch_index = [0]
    handles = []
    params_per_layer = []
    for layer, stats in zip(layers, layer_stats, strict=True):
        params = layer_projections(layer)
        params_per_layer.append(params)
        for name, param in params.items():
            param.requires_grad_(True)
            handles.append(
                param.register_hook(
                    _grad_hook(
                        stats,
                        batch_index,
                        name,
                        param,
                        stats.shape.head_dim,
                        want_fisher,
                    )
                )
            )
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, args, s=stats: s.add_input("o", args[0])
            )
        )
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, s=stats: s.add_input("down", args[0])
            )
        )

        def influence(_m, args, kwargs, output, s=stats):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.detach(), h_out.detach(), dim=-1)
            s.influence_sum += float((1 - cos).sum())

        handles.append(layer.register_forward_hook(influence, with_kwargs=True))

    losses = []
    batches = torch.split(windows, batch_size)
    try:
        for index, batch in enumerate(
            tqdm(batches, desc="calibration", disable=not progress)
        ):
            batch_index[0] = index
            for stats in layer_stats:
                stats.batch_vector_atoms.append({})
                stats.batch_element_atoms.append({})
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
    num_batches = len(batches)
    grads, weights = [], []
    for params, stats in zip(params_per_layer, layer_stats, strict=True):
        grads.append({n: p.grad.div_(num_batches) for n, p in params.items()})
        weights.append({n: p.detach() for n, p in params.items()})
        for fisher in stats.fisher.values():
            fisher.div_(num_batches)
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    log.info(
        "calibration: %d batches, mean loss %.3f",
        num_batches,
        sum(losses) / num_batches,
    )
    return CalibrationStats(
        layers=layer_stats,
        grads=grads,
        weights=weights,
        num_batches=num_batches,
        num_tokens=int(windows.numel()),
        losses=losses,
    )

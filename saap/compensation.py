"""Compensation for removed input channels of o_proj and down_proj.

Removing input channels of a projection ``y = W x + b`` changes its output. Two
compensations, both from calibration inputs of the dense model:

- ``bias`` (FLAP): the removed channels' mean contribution moves into the bias,
  ``b += W[:, removed] @ mean(x[removed])``;
- ``least_squares``: the kept columns and the bias are refitted together so that
  the pruned projection reproduces the dense one on the calibration inputs,

      min_{W', b'}  sum_x || W' x_K + b' - (W x + b) ||^2 + lambda || W' - W_K ||^2

  a ridge regression with one linear solve per projection, from the Gram matrix
  ``sum x x^T``, the sum ``sum x`` and the token count. ``lambda`` is ``ridge``
  times the mean diagonal of the kept channels' Gram block, so the penalty does
  not depend on the scale of the activations. Without the ridge term and with all
  channels kept the refit returns ``W`` and ``b`` unchanged; with the bias alone
  free it is FLAP's compensation, so its reconstruction error is never above
  bias-only compensation on the same inputs (tested).

Where the inputs come from (``least_squares_inputs``):

- ``dense``: every projection is fitted on the dense model's inputs, all layers
  from one forward pass of the dense model (:func:`plan_grams`). Layer ``l`` of
  the pruned model, however, sees the inputs that the pruned (and refitted)
  layers before it produce, not the dense ones;
- ``pruned`` (sequential): the layers are refitted in order, each projection on
  the inputs it really receives in the pruned model with every earlier layer
  already refitted, against the same target, the dense projection's output on
  the dense inputs (:func:`sequential_refit`):

      min_{W', b'}  sum_t || W' x'_K,t + b' - (W x_t + b) ||^2 + lambda || W' - W_K ||^2

  so that each refit also corrects the error that the layers before it left.
  The normal equations need the pruned inputs' Gram matrix and their cross
  moments with the dense outputs; one pass of one decoder layer at a time over
  the calibration windows (hidden states of both models held in memory: tokens x
  hidden size each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap.model import decoder_layers


@dataclass
class InputGram:
    """Second moments of one projection's inputs over calibration tokens."""

    gram: torch.Tensor  # (C, C) float64, sum x x^T
    total: torch.Tensor  # (C,) float64, sum x
    tokens: int

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram += x.T @ x
        self.total += x.sum(0)
        self.tokens += x.shape[0]


@torch.no_grad()
def input_grams(
    model: nn.Module, windows: torch.Tensor, layers: list[int], batch_size: int = 4
) -> dict[int, dict[str, InputGram]]:
    """Gram matrices of the inputs of o_proj (``o``) and down_proj (``down``) of
    the decoder ``layers``, from one forward pass of ``model`` over ``windows``.
    Memory: ``C^2`` float64 per projection and layer."""
    grams: dict[int, dict[str, InputGram]] = {}
    handles = []
    blocks = decoder_layers(model)
    for index in layers:
        attn, mlp = blocks[index].self_attn, blocks[index].mlp
        entry = {}
        for which, linear in (("o", attn.o_proj), ("down", mlp.down_proj)):
            size = linear.weight.shape[1]
            gram = InputGram(
                torch.zeros(size, size, dtype=torch.float64),
                torch.zeros(size, dtype=torch.float64),
                0,
            )
            entry[which] = gram
            handles.append(
                linear.register_forward_pre_hook(
                    lambda _m, args, g=gram: g.add(args[0])
                )
            )
        grams[index] = entry
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def ridge_solve(
    gram: torch.Tensor,
    total: torch.Tensor,
    tokens: float,
    cross: torch.Tensor,
    out_total: torch.Tensor,
    prior: torch.Tensor,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` minimising ``sum_t ||W' x_t + b' - y_t||^2 + lambda ||W' -
    prior||^2`` from the moments of the inputs (``gram`` = sum x x^T, ``total`` =
    sum x, ``tokens``) and of the targets (``cross`` = sum y x^T, ``out_total``
    = sum y), all float64. The bias is not penalised; ``lambda`` is ``ridge``
    times the mean diagonal of ``gram``."""
    k = gram.shape[0]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    system = torch.empty(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = gram + lam * torch.eye(k, dtype=torch.float64)
    system[:k, k] = total
    system[k, :k] = total
    system[k, k] = tokens
    rhs = torch.empty(cross.shape[0], k + 1, dtype=torch.float64)
    rhs[:, :k] = cross + lam * prior
    rhs[:, k] = out_total
    solution = torch.linalg.solve(system, rhs.T).T
    return solution[:, :k], solution[:, k]


def least_squares_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    stats: InputGram,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refitted ``(W', b')`` of a projection keeping input channels ``kept``.

    Normal equations of the ridge problem above, in the augmented inputs
    ``[x_K; 1]`` (the bias is not penalised); the targets ``W x + b`` are on the
    same (dense) inputs, so their moments follow from the input Gram matrix."""
    w = weight.detach().double()
    b = (
        bias.detach().double()
        if bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64)
    )
    g, s, n = stats.gram, stats.total, float(stats.tokens)
    # sum (W x + b) x_K^T and sum (W x + b)
    cross = w @ g[:, kept] + torch.outer(b, s[kept])
    out_total = w @ s + n * b
    new_w, new_b = ridge_solve(
        g[kept][:, kept], s[kept], n, cross, out_total, w[:, kept], ridge
    )
    return new_w.to(weight.dtype).contiguous(), new_b.to(weight.dtype).contiguous()


def plan_grams(
    model: nn.Module, plan, windows: torch.Tensor, batch_size: int = 4
) -> dict[int, dict[str, InputGram]]:
    """Input Gram matrices of the layers whose o_proj or down_proj lose input
    channels under ``plan`` (what :func:`saap.prune.prune_model` refits)."""
    layers = [
        entry.index for entry in plan.layers if not entry.removed and entry.ratio > 0
    ]
    return input_grams(model, windows, layers, batch_size)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, windows: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """The hidden states entering decoder layer 0 for ``windows`` and the keyword
    arguments the model passes to every layer (positions, rotary embeddings,
    mask): what is needed to run the decoder one layer at a time."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=windows, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _projection_io(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, linear: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``linear`` (inside ``layer``) as (tokens, C), from one
    pass of the layer over ``hidden``, stopped right after ``linear``."""
    captured = {}

    def hook(_module, args, output):
        captured["x"] = args[0].reshape(-1, args[0].shape[-1])
        captured["y"] = output.reshape(-1, output.shape[-1])
        raise _Stop

    handle = linear.register_forward_hook(hook)
    try:
        _run_layer(layer, hidden, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"], captured["y"]


@torch.no_grad()
def _module_input(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, module: nn.Module
) -> torch.Tensor:
    """The (first positional) input of ``module`` inside ``layer`` from one pass
    of the layer over ``hidden``, stopped there."""
    captured = {}

    def hook(_module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        _run_layer(layer, hidden, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"]


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype).contiguous())
    else:
        linear.bias.data = bias.to(linear.weight.dtype).contiguous()


def _kept_inputs(entry, which: str, head_dim: int) -> torch.Tensor:
    if which == "down":
        return torch.as_tensor(entry.kept_channels, dtype=torch.long)
    heads = torch.as_tensor(entry.kept_heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def sequential_refit(
    dense: nn.Module,
    pruned: nn.Module,
    plan,
    windows: torch.Tensor,
    ridge: float,
    target: str = "self",
) -> list[dict]:
    """Refit, in place and in layer order, the o_proj and down_proj of ``pruned``
    that lost input channels under ``plan``, each on the hidden states the pruned
    model gives it (earlier layers already refitted). ``dense`` is the model the
    plan was replayed on. The target (module docstring):

    - ``self``: the dense projection applied to the full input it would get from
      those hidden states (all heads, all channels), so the kept columns take over
      the removed ones' contribution on the pruned model's own distribution;
    - ``dense``: the dense projection's output on the dense model's hidden states,
      so each refit also tries to undo the error of the layers before it.

    Returns, per refitted projection, its relative reconstruction error of the
    target on those inputs before and after the refit."""
    if target not in ("self", "dense"):
        raise ValueError(f"target {target!r}: use 'self' or 'dense'")
    dense_layers = decoder_layers(dense)
    pruned_layers = decoder_layers(pruned)
    if len(dense_layers) != len(plan.layers):
        raise ValueError(
            f"plan has {len(plan.layers)} layers, the dense model {len(dense_layers)}"
        )
    head_dim = dense_layers[0].self_attn.head_dim
    h_dense, kw_dense = first_layer_inputs(dense, windows)
    h_pruned, kw_pruned = first_layer_inputs(pruned, windows)
    report = []
    j = 0
    for index, entry in enumerate(plan.layers):
        dense_layer = dense_layers[index]
        if entry.removed:
            if target == "dense":
                h_dense = _run_layer(dense_layer, h_dense, kw_dense)
            continue
        layer = pruned_layers[j]
        j += 1
        for which, name in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
            linear = layer.get_submodule(name)
            reference = dense_layer.get_submodule(name)
            if linear.in_features == reference.in_features:
                continue  # nothing cut
            if target == "self":
                # the dense projection's full input from the pruned hidden states:
                # attention of all heads on this layer's input, or the MLP's
                # channels on the MLP input the pruned (refitted) attention gives
                if which == "o":
                    x_full, y = _projection_io(
                        dense_layer, h_pruned, kw_pruned, reference
                    )
                else:
                    h_mlp = _module_input(layer, h_pruned, kw_pruned, layer.mlp)
                    x_full, y = _projection_io(dense_layer.mlp, h_mlp, {}, reference)
                x = x_full[:, _kept_inputs(entry, which, head_dim)]
                y_before = linear(x)
            else:
                _, y = _projection_io(dense_layer, h_dense, kw_dense, reference)
                x, y_before = _projection_io(layer, h_pruned, kw_pruned, linear)
            x64, y64 = x.double(), y.double()
            new_w, new_b = ridge_solve(
                x64.T @ x64,
                x64.sum(0),
                float(x64.shape[0]),
                y64.T @ x64,
                y64.sum(0),
                linear.weight.double(),
                ridge,
            )
            _set_linear(linear, new_w, new_b)
            scale = float(y64.square().sum().clamp_min(1e-30))
            after = linear(x).double()
            report.append(
                {
                    "layer": index,
                    "projection": which,
                    "error_before": float((y_before.double() - y64).square().sum())
                    / scale,
                    "error_after": float((after - y64).square().sum()) / scale,
                }
            )
        if target == "dense":
            h_dense = _run_layer(dense_layer, h_dense, kw_dense)
        h_pruned = _run_layer(layer, h_pruned, kw_pruned)
    return report

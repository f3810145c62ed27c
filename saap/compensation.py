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
def _capture(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, module: nn.Module, output
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input (and, with ``output``, output) of ``module`` inside ``layer`` from
    one pass of the layer over ``hidden``, stopped right there."""
    captured = {}

    def hook(_module, args, out=None):
        captured["x"], captured["y"] = args[0], out
        raise _Stop

    handle = (
        module.register_forward_hook(hook)
        if output
        else module.register_forward_pre_hook(hook)
    )
    try:
        _run_layer(layer, hidden, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"], captured["y"]


def _projection_io(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, linear: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``linear`` (inside ``layer``) as (tokens, C)."""
    x, y = _capture(layer, hidden, kwargs, linear, output=True)
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _module_input(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, module: nn.Module
) -> torch.Tensor:
    """The (first positional) input of ``module`` inside ``layer``."""
    return _capture(layer, hidden, kwargs, module, output=False)[0]


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype).contiguous())
    else:
        linear.bias.data = bias.to(linear.weight.dtype).contiguous()


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads: ``h*hd .. (h+1)*hd - 1`` for each ``h``."""
    heads_t = torch.as_tensor(heads, dtype=torch.long)
    return (heads_t[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _kept_inputs(entry, which: str, head_dim: int) -> torch.Tensor:
    if which == "down":
        return torch.as_tensor(entry.kept_channels, dtype=torch.long)
    return head_rows(entry.kept_heads, head_dim)


class _MLPProbe(nn.Module):
    """Stands in for a pruned layer's MLP for one pass: runs the dense layer's MLP
    on the MLP input, keeps its down_proj's full input and output, and returns
    zeros, so that the layer returns its residual stream before the MLP."""

    def __init__(self, dense_mlp: nn.Module) -> None:
        super().__init__()
        self.dense_mlp = dense_mlp
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.x, self.y = _capture(
            self.dense_mlp, hidden, {}, self.dense_mlp.down_proj, output=True
        )
        return torch.zeros_like(hidden)


class _Stream:
    """Hidden states of the dense and the pruned model entering the current
    layer, for one set of windows.

    Where a layer's down_proj is refitted, the pruned layer runs once with the
    dense MLP in place of its own (:class:`_MLPProbe`): that gives the residual
    stream before the MLP, the dense down_proj's full input (whose kept channels
    are the pruned down_proj's input: the kept rows of gate_proj and up_proj are
    the dense ones) and its output. After the refit, the layer's output is that
    residual plus the refitted down_proj of the kept channels: the decoder
    layers of the LLaMA family add the MLP's output to the residual stream last.
    """

    def __init__(self, dense: nn.Module, pruned: nn.Module, windows, track_dense):
        self.h_pruned, self.kw_pruned = first_layer_inputs(pruned, windows)
        self.track_dense = track_dense
        if track_dense:
            self.h_dense, self.kw_dense = first_layer_inputs(dense, windows)
        # after a probe of the current layer: the residual before its MLP and
        # the pruned down_proj's input
        self.h_mid: torch.Tensor | None = None
        self.down_input: torch.Tensor | None = None

    def _probe_mlp(self, layer, dense_layer):
        probe = _MLPProbe(dense_layer.mlp)
        own = layer.mlp
        layer.mlp = probe
        try:
            self.h_mid = _run_layer(layer, self.h_pruned, self.kw_pruned)
        finally:
            layer.mlp = own
        return probe.x, probe.y

    def fit_data(self, target, which, dense_layer, layer, kept):
        """``(x, y)``: the pruned projection's inputs and the target outputs."""
        name = "self_attn.o_proj" if which == "o" else "mlp.down_proj"
        reference = dense_layer.get_submodule(name)
        if which == "down":
            # the MLP's channels on the MLP input that the pruned (refitted)
            # attention gives
            x_full, y = self._probe_mlp(layer, dense_layer)
            self.down_input = x_full[..., kept]
            if target == "dense":
                _, y = _projection_io(
                    dense_layer, self.h_dense, self.kw_dense, reference
                )
            return self.down_input.reshape(-1, len(kept)), y.reshape(-1, y.shape[-1])
        if target == "dense":
            _, y = _projection_io(dense_layer, self.h_dense, self.kw_dense, reference)
            x, _ = _projection_io(
                layer, self.h_pruned, self.kw_pruned, layer.get_submodule(name)
            )
            return x, y
        # the dense projection's full input from the pruned hidden states:
        # attention of all heads on this layer's input
        x_full, y = _projection_io(
            dense_layer, self.h_pruned, self.kw_pruned, reference
        )
        return x_full[:, kept], y

    def advance(self, dense_layer, layer) -> None:
        if self.track_dense:
            self.h_dense = _run_layer(dense_layer, self.h_dense, self.kw_dense)
        if layer is None:
            return
        if self.down_input is not None:
            self.h_pruned = self.h_mid + layer.mlp.down_proj(self.down_input)
            self.h_mid = self.down_input = None
        else:
            self.h_pruned = _run_layer(layer, self.h_pruned, self.kw_pruned)


def _error(linear_w, linear_b, x, y) -> float:
    """``sum_t ||W x_t + b - y_t||^2``, the product in float32 (it only ranks
    ridges and reports errors), the sum in float64."""
    out = x.float() @ linear_w.float().T + linear_b.float()
    return float((out - y.float()).double().square().sum())


# tokens per float32 product in :func:`fit_moments_of`
MOMENT_CHUNK = 2048


def fit_moments_of(
    x: torch.Tensor, y: torch.Tensor, chunk: int = MOMENT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor, float]:
    """The moments a ridge fit of ``y`` on ``x`` (tokens, C) needs: ``sum x x^T``,
    ``sum x``, the token count, ``sum y x^T``, ``sum y`` and ``sum ||y||^2``,
    float64. Each block of ``chunk`` tokens is multiplied in float32 (1.6x
    float64's speed on a 2-core AMD EPYC VM: a Gram matrix in 0.40 s
    against 0.64 s) and the blocks are summed in float64, so the rounding stays
    that of a ``chunk``-token float32 sum."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    k, m = x.shape[1], y.shape[1]
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(m, k, dtype=torch.float64)
    x_total = torch.zeros(k, dtype=torch.float64)
    y_total = torch.zeros(m, dtype=torch.float64)
    squares = 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        xs, ys = xs.float(), ys.float()
        gram += xs.T @ xs
        cross += ys.T @ xs
        x_total += xs.double().sum(0)
        y_total += ys.double().sum(0)
        squares += float(ys.double().square().sum())
    return gram, x_total, float(x.shape[0]), cross, y_total, squares


def moment_error(
    weight: torch.Tensor,
    bias: torch.Tensor,
    gram: torch.Tensor,
    total: torch.Tensor,
    tokens: float,
    cross: torch.Tensor,
    out_total: torch.Tensor,
    out_squares: float,
) -> float:
    """``sum_t ||W x_t + b - y_t||^2`` from the moments of the fit (``gram`` = sum
    x x^T, ``total`` = sum x, ``cross`` = sum y x^T, ``out_total`` = sum y,
    ``out_squares`` = sum ||y||^2), float64: a (out, k, k) product instead of
    one over every token."""
    fitted = float(((weight @ gram) * weight).sum())
    fitted += 2 * float(bias @ (weight @ total)) + tokens * float(bias @ bias)
    mixed = float((weight * cross).sum()) + float(bias @ out_total)
    return max(fitted - 2 * mixed + out_squares, 0.0)


@torch.no_grad()
def sequential_refit(
    dense: nn.Module,
    pruned: nn.Module,
    plan,
    windows: torch.Tensor,
    ridge: float,
    target: str = "self",
    ridges: list[float] | None = None,
    holdout: torch.Tensor | None = None,
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

    With ``ridges`` and ``holdout`` windows, each projection takes the ridge of
    the list whose fit reconstructs the target best on the held-back windows
    (carried through the pruned model alongside); ``ridge`` otherwise.

    Returns, per refitted projection, the ridge used and the relative
    reconstruction error of the target on the fit inputs before and after the
    refit (and on the held-back ones, where given)."""
    if target not in ("self", "dense"):
        raise ValueError(f"target {target!r}: use 'self' or 'dense'")
    if ridges and holdout is None:
        raise ValueError("choosing the ridge from a list needs held-back windows")
    dense_layers = decoder_layers(dense)
    pruned_layers = decoder_layers(pruned)
    if len(dense_layers) != len(plan.layers):
        raise ValueError(
            f"plan has {len(plan.layers)} layers, the dense model {len(dense_layers)}"
        )
    head_dim = dense_layers[0].self_attn.head_dim
    track = target == "dense"
    fit = _Stream(dense, pruned, windows, track)
    check = _Stream(dense, pruned, holdout, track) if ridges else None
    report = []
    j = 0
    for index, entry in enumerate(plan.layers):
        dense_layer = dense_layers[index]
        if entry.removed:
            for stream in (fit, check):
                if stream is not None:
                    stream.advance(dense_layer, None)
            continue
        layer = pruned_layers[j]
        j += 1
        for which, name in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
            linear = layer.get_submodule(name)
            if linear.in_features == dense_layer.get_submodule(name).in_features:
                continue  # nothing cut
            kept = _kept_inputs(entry, which, head_dim)
            x, y = fit.fit_data(target, which, dense_layer, layer, kept)
            w0 = linear.weight.double()
            *moments, squares = fit_moments_of(x, y)
            b0 = (
                linear.bias.double()
                if linear.bias is not None
                else torch.zeros(w0.shape[0], dtype=torch.float64)
            )
            row = {"layer": index, "projection": which}
            candidates = ridges or [ridge]
            fits = [ridge_solve(*moments, w0, r) for r in candidates]
            chosen = 0
            if check is not None:
                xh, yh = check.fit_data(target, which, dense_layer, layer, kept)
                errors = [_error(w, b, xh, yh) for w, b in fits]
                chosen = min(range(len(fits)), key=errors.__getitem__)
                scale_h = max(float(yh.double().square().sum()), 1e-30)
                row["holdout_before"] = _error(w0, b0, xh, yh) / scale_h
                row["holdout_after"] = errors[chosen] / scale_h
            new_w, new_b = fits[chosen]
            scale = max(squares, 1e-30)
            row["ridge"] = candidates[chosen]
            row["error_before"] = moment_error(w0, b0, *moments, squares) / scale
            row["error_after"] = moment_error(new_w, new_b, *moments, squares) / scale
            _set_linear(linear, new_w, new_b)
            report.append(row)
        for stream in (fit, check):
            if stream is not None:
                stream.advance(dense_layer, layer)
    return report

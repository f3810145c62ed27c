"""Calibration statistics gathered in explicit accumulators.

A first pass over the calibration windows, batch by batch, collects per decoder
layer:

- the mean gradient of every projection over the windows (kept in ``.grad``
  itself, which autograd accumulates across batches: no extra copy);
- per-batch element-wise Taylor group scores (tiny), from gradient hooks that see
  each batch's gradient before it is accumulated: the layer ranking's
  importance-fluctuation indicator;
- sums of the inputs of o_proj and down_proj and of their squares (float64) for
  FLAP's fluctuation, Wanda-sp's input norms and FLAP's bias compensation;
- the block influence ``1 - cos(h_in, h_out)`` of each layer (ShortGPT).

Per-window gradients are needed when a second-order estimator needs the Fisher
diagonal or when estimators are to be jackknifed (SAAP's uncertainty). By default
(``per_window="stored"``) the first pass keeps every projection's input and
output gradient instead, and computes no weight gradient in its backward: each
window's gradient is formed from them afterwards (``N * dY_i^T X_i``: window
``i``'s own mean-loss gradient, since the first pass weights each window by
``1/N``), and the mean gradient, the per-batch scores and the input sums from
the same kept tensors. ``per_window="second_pass"`` instead runs the first pass
with weight gradients and hooks as above, then a second forward and backward,
one window at a time (no stored activations: for models whose activations do
not fit in memory). Either way:

- the Fisher diagonal as the mean of squared per-window gradients (one extra
  float32 copy of the layer weights);
- for each jackknifed gradient estimator, its group scores computed on the mean
  gradient of all windows but one (leave-one-out), one set per window;
- each window's own input sums of o_proj and down_proj, from which the
  activation estimators' leave-one-out scores follow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.errors import PruningError
from saap.importance.taylor import (
    IndexFn,
    add_atoms,
    element1_index,
    groups_from_atoms,
)
from saap.model import LayerShape, decoder_layers, layer_shapes

log = logging.getLogger(__name__)


def projection_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear modules of one decoder layer by short name."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "q": attn.q_proj,
        "k": attn.k_proj,
        "v": attn.v_proj,
        "o": attn.o_proj,
        "gate": mlp.gate_proj,
        "up": mlp.up_proj,
        "down": mlp.down_proj,
    }


def layer_projections(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable parameters of one decoder layer by short name."""
    attn = layer.self_attn
    params = {n: m.weight for n, m in projection_modules(layer).items()}
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
    # per batch: atom -> sum |W*g| (the fluctuation indicator)
    batch_element_atoms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # per window (either mode): "o_sum", "o_sq", "down_sum", "down_sq", "tokens"
    sample_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # per jackknifed metric, per window: atom -> leave-one-out atom sums
    loo_atoms: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

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

    def open_window(self) -> None:
        """Slots for the next window's input sums and leave-one-out atoms."""
        self.sample_inputs.append({})
        for per_sample in self.loo_atoms.values():
            per_sample.append({})

    def close_windows(self, num_samples: int, jackknifed: bool) -> None:
        """After every window: the Fisher sums become means; the per-window input
        sums are kept only for the jackknife."""
        for fisher in self.fisher.values():
            fisher.div_(num_samples)
        if not jackknifed:
            self.sample_inputs = []

    def total_window_inputs(self) -> None:
        """The input sums over all tokens from the per-window ones."""
        windows = self.sample_inputs
        self.o_in_sum = torch.stack([w["o_sum"] for w in windows]).sum(0)
        self.o_in_sq = torch.stack([w["o_sq"] for w in windows]).sum(0)
        self.down_in_sum = torch.stack([w["down_sum"] for w in windows]).sum(0)
        self.down_in_sq = torch.stack([w["down_sq"] for w in windows]).sum(0)
        self.tokens = int(sum(float(w["tokens"]) for w in windows))

    def add_sample_input(self, which: str, x: torch.Tensor) -> None:
        """Record one window's input sums of o_proj or down_proj."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        slot = self.sample_inputs[-1]
        slot[f"{which}_sum"] = x.sum(0)
        slot[f"{which}_sq"] = x.square().sum(0)
        slot["tokens"] = torch.tensor(float(x.shape[0]), dtype=torch.float64)


@dataclass
class InputMoments:
    """Sums of one projection's inputs over tokens: ``total`` and ``squares``
    (channels,) or (windows, channels) for leave-one-out moments, and
    ``tokens`` (scalar or (windows, 1))."""

    total: torch.Tensor
    squares: torch.Tensor
    tokens: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.tokens.clamp_min(1)).float()

    @property
    def variance(self) -> torch.Tensor:
        n = self.tokens.clamp_min(1)
        mean = self.total / n
        return (self.squares / n - mean.square()).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        return self.squares.clamp_min(0).sqrt().float()


@dataclass
class CalibrationStats:
    """Everything the estimators need, for every decoder layer."""

    layers: list[LayerStats]
    grads: list[dict[str, torch.Tensor]]
    weights: list[dict[str, torch.Tensor]]
    num_batches: int
    num_tokens: int
    losses: list[float]
    # windows of the second pass (0: none ran)
    num_samples: int = 0

    def moments(self, index: int, which: str) -> InputMoments:
        """Input moments of o_proj (``o``) or down_proj (``down``) of a layer."""
        stats = self.layers[index]
        total, squares = (
            (stats.o_in_sum, stats.o_in_sq)
            if which == "o"
            else (stats.down_in_sum, stats.down_in_sq)
        )
        return InputMoments(
            total, squares, torch.tensor(float(stats.tokens), dtype=torch.float64)
        )

    def loo_moments(self, index: int, which: str) -> InputMoments:
        """Input moments without each window in turn: (windows, channels)."""
        stats = self.layers[index]
        if not stats.sample_inputs:
            raise ValueError(
                "leave-one-out moments need statistics collected with a jackknife "
                "(collect_statistics(..., jackknife={...}))"
            )
        full = self.moments(index, which)
        samples = stats.sample_inputs
        return InputMoments(
            full.total - torch.stack([s[f"{which}_sum"] for s in samples]),
            full.squares - torch.stack([s[f"{which}_sq"] for s in samples]),
            full.tokens - torch.stack([s["tokens"] for s in samples]).unsqueeze(1),
        )

    def input_mean(self, index: int, which: str) -> torch.Tensor:
        """Mean input of o_proj (``o``) or down_proj (``down``) of a layer."""
        return self.moments(index, which).mean

    def input_variance(self, index: int, which: str) -> torch.Tensor:
        """Per-channel variance of the input over calibration tokens."""
        return self.moments(index, which).variance

    def input_norm(self, index: int, which: str) -> torch.Tensor:
        """Per-channel L2 norm of the input over calibration tokens."""
        return self.moments(index, which).norm

    def batch_scores(self, index: int) -> dict[str, torch.Tensor]:
        """Per-batch element-wise Taylor group scores (B, n) of a layer."""
        stats = self.layers[index]
        per_batch = [
            groups_from_atoms(a, stats.shape.num_kv_heads)
            for a in stats.batch_element_atoms
        ]
        return {
            kind: torch.stack([b[kind] for b in per_batch]) for kind in per_batch[0]
        }

    def loo_scores(
        self,
        index: int,
        metric: str,
        finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> dict[str, torch.Tensor]:
        """Leave-one-window-out group scores (N, n) of a jackknifed gradient
        estimator."""
        stats = self.layers[index]
        if metric not in stats.loo_atoms:
            raise ValueError(
                f"no leave-one-out scores of {metric!r} were collected; pass it in "
                "collect_statistics(..., jackknife=...)"
            )
        per_sample = stats.loo_atoms[metric]
        atoms = {a: torch.stack([s[a] for s in per_sample]) for a in per_sample[0]}
        atoms.setdefault(
            "kv_head", torch.zeros(len(per_sample), stats.shape.num_kv_heads)
        )
        return groups_from_atoms(atoms, stats.shape.num_kv_heads, finish)

    def block_influence(self) -> torch.Tensor:
        """Mean ``1 - cos(h_in, h_out)`` per layer, (L,)."""
        return torch.tensor([s.influence_sum / max(s.tokens, 1) for s in self.layers])


def _input_hooks(layer: nn.Module, record: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks passing the inputs of o_proj (``"o"``) and down_proj
    (``"down"``) of ``layer`` to ``record``."""
    return [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: record("o", args[0])
        ),
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: record("down", args[0])
        ),
    ]


def _batch_hook(stats: LayerStats, name: str, weight: torch.Tensor, head_dim: int):
    def hook(grad: torch.Tensor) -> None:
        # this batch's |W*g|, before accumulation
        add_atoms(
            stats.batch_element_atoms[-1],
            name,
            element1_index(name, weight.detach(), grad),
            head_dim,
        )

    return hook


def _window_terms(
    stats: LayerStats,
    name: str,
    weight: torch.Tensor,
    grad: torch.Tensor,
    total: torch.Tensor | None,
    num_samples: int,
    jackknife: Mapping[str, IndexFn],
    want_fisher: bool,
) -> dict[str, torch.Tensor]:
    """What one window's gradient ``grad`` of the projection ``name`` adds: its
    square to the Fisher diagonal, and the leave-this-window-out per-row
    saliences of every jackknifed metric (``total``: the gradient sum over all
    windows)."""
    if want_fisher:
        if name in stats.fisher:
            stats.fisher[name].addcmul_(grad, grad)
        else:
            stats.fisher[name] = grad.square()
    if not jackknife:
        return {}
    # the mean gradient of every window but this one
    loo = (total - grad).div_(num_samples - 1)
    return {
        metric: index_fn(name, weight, loo) for metric, index_fn in jackknife.items()
    }


def _sample_hook(
    stats: LayerStats,
    name: str,
    weight: torch.Tensor,
    mean_grad: torch.Tensor,
    num_samples: int,
    jackknife: Mapping[str, IndexFn],
    want_fisher: bool,
):
    """Second pass: what one window's gradient of the projection ``name`` adds."""
    # the gradient sum over all windows, formed once
    total = mean_grad * num_samples if jackknife else None
    weight = weight.detach()
    head_dim = stats.shape.head_dim

    def hook(grad: torch.Tensor) -> None:
        terms = _window_terms(
            stats, name, weight, grad, total, num_samples, jackknife, want_fisher
        )
        for metric, per_index in terms.items():
            add_atoms(stats.loo_atoms[metric][-1], name, per_index, head_dim)

    return hook


def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    want_fisher: bool = True,
    progress: bool = True,
    jackknife: Mapping[str, IndexFn] | None = None,
    per_window: str = "stored",
) -> CalibrationStats:
    """Run the calibration ``windows`` (N, T) through ``model`` (float32).

    The gradient is that of the mean next-token loss over all windows. With
    ``want_fisher`` or ``jackknife`` (metric name -> per-index salience function
    of :mod:`saap.importance.taylor`), each window's own gradient gives the
    per-window Fisher diagonal and leave-one-out scores: formed from the first
    pass's stored activations (``per_window="stored"``) or from a second pass,
    one window at a time (``"second_pass"``).
    """
    if per_window not in PER_WINDOW:
        raise ValueError(
            f"per_window {per_window!r} is not known; use one of {PER_WINDOW}"
        )
    jackknife = dict(jackknife or {})
    needs_windows = bool(want_fisher or jackknife)
    if jackknife and windows.shape[0] < 2:
        raise ValueError(
            "the jackknife needs at least 2 calibration windows, got "
            f"{windows.shape[0]}; raise calibration.num_samples"
        )
    stored = needs_windows and per_window == "stored"
    if stored:
        check_stored_memory(model, windows)
    shapes = layer_shapes(model)
    layers = decoder_layers(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    layer_stats = [LayerStats(shape=shape) for shape in shapes]
    handles = []
    params_per_layer = []
    for layer, stats in zip(layers, layer_stats, strict=True):
        params = layer_projections(layer)
        params_per_layer.append(params)

        def influence(_m, args, kwargs, output, s=stats):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.detach(), h_out.detach(), dim=-1)
            s.influence_sum += float((1 - cos).sum())

        handles.append(layer.register_forward_hook(influence, with_kwargs=True))
        if stored:
            # the kept activations give every gradient afterwards: the backward
            # needs no weight gradients, only those of the activations
            continue
        for name, param in params.items():
            param.requires_grad_(True)
            handles.append(
                param.register_hook(
                    _batch_hook(stats, name, param, stats.shape.head_dim)
                )
            )
        handles += _input_hooks(layer, stats.add_input)
    records = [_Record(layer) for layer in layers] if stored else []
    for record in records:
        handles += record.hooks
    if stored:
        # gradients flow from the embeddings' output on
        handles.append(
            model.get_input_embeddings().register_forward_hook(
                lambda _m, _args, output: output.requires_grad_(True)
            )
        )

    num_samples = windows.shape[0]
    losses = []
    batches = torch.split(windows, batch_size)
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            if not stored:
                for stats in layer_stats:
                    stats.batch_element_atoms.append({})
            loss = model(input_ids=batch, labels=batch).loss
            # weighted by the batch's share of windows: .grad ends up holding the
            # mean over windows of each window's mean-loss gradient
            (loss * (batch.shape[0] / num_samples)).backward()
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
    weights = [{n: p.detach() for n, p in ps.items()} for ps in params_per_layer]
    if stored:
        grads = _stored_per_window(
            records,
            layer_stats,
            weights,
            jackknife,
            want_fisher,
            _window_buffer_size(model, windows),
        )
    else:
        grads = []
        for params in params_per_layer:
            grads.append({n: p.grad for n, p in params.items()})
            for p in params.values():
                p.grad = None
    if needs_windows and not stored:
        _per_window_pass(
            model,
            windows,
            layers,
            layer_stats,
            params_per_layer,
            grads,
            jackknife,
            want_fisher,
            progress,
        )
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    log.info(
        "calibration: %d batches, mean loss %.3f%s",
        len(batches),
        sum(losses) / len(batches),
        f"; per-window gradients of {num_samples} windows ({per_window})"
        if needs_windows
        else "",
    )
    return CalibrationStats(
        layers=layer_stats,
        grads=grads,
        weights=weights,
        num_batches=len(batches),
        num_tokens=int(windows.numel()),
        losses=losses,
        num_samples=num_samples if needs_windows else 0,
    )


PER_WINDOW = ("stored", "second_pass")

# the projections whose inputs are kept, by the name of the input they share:
# q, k and v read the attention input, gate and up the MLP input
_INPUT_OF = {
    "q": "attn",
    "k": "attn",
    "v": "attn",
    "o": "o",
    "gate": "mlp",
    "up": "mlp",
    "down": "down",
}


def stored_bytes(model: nn.Module, windows: torch.Tensor) -> int:
    """Bytes the stored per-window mode keeps: every projection's input (shared
    ones once) and output gradient, float32, for every calibration token; and
    the per-window gradients of one projection at a time (windows x its
    largest weight, :func:`_window_buffer`)."""
    per_token = 0
    for layer in decoder_layers(model):
        modules = projection_modules(layer)
        inputs = {
            _INPUT_OF[name]: module.in_features for name, module in modules.items()
        }
        per_token += sum(inputs.values())
        per_token += sum(module.out_features for module in modules.values())
    return (per_token * int(windows.numel()) + _window_buffer_size(model, windows)) * 4


def _window_buffer_size(model: nn.Module, windows: torch.Tensor) -> int:
    """Elements of the per-window gradients of the largest projection."""
    largest = max(
        module.weight.numel()
        for layer in decoder_layers(model)
        for module in projection_modules(layer).values()
    )
    return windows.shape[0] * largest


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_stored_memory(model: nn.Module, windows: torch.Tensor) -> None:
    """Refuse the stored mode where its activations would not fit in memory."""
    need, free = stored_bytes(model, windows), available_bytes()
    if free is not None and need > 0.7 * free:
        raise PruningError(
            f"keeping the calibration activations for the per-window gradients "
            f"needs {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free: set "
            "importance.per_window: second_pass (a second forward and backward per "
            "window instead) or use fewer calibration windows"
        )


class _Record:
    """Hooks keeping one decoder layer's projection inputs and output gradients
    during the first pass, batch by batch."""

    def __init__(self, layer: nn.Module) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.hooks = []
        for name, module in projection_modules(layer).items():
            site = _INPUT_OF[name]
            if site not in self.inputs:
                self.inputs[site] = []
                self.hooks.append(
                    module.register_forward_pre_hook(
                        lambda _m, args, site=site: self.inputs[site].append(
                            args[0].detach()
                        )
                    )
                )
            self.grads[name] = []
            self.hooks.append(module.register_forward_hook(self._keep_grad(name)))

    def _keep_grad(self, name: str):
        def forward_hook(_m, _args, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda g: self.grads[name].append(g.detach()))

        return forward_hook

    def take(self) -> tuple[dict, dict]:
        """The kept (batch, tokens, features) inputs by site and output gradients
        by projection, one list entry per batch; the record lets them go."""
        inputs, grads = self.inputs, self.grads
        self.inputs, self.grads = {}, {}
        return inputs, grads


def _window_hooks(
    stats: LayerStats,
    params: dict[str, nn.Parameter],
    mean_grads: dict[str, torch.Tensor],
    num_samples: int,
    jackknife: dict[str, IndexFn],
    want_fisher: bool,
) -> dict[str, Callable[[torch.Tensor], None]]:
    """One layer's per-window hooks by projection (fresh leave-one-out lists)."""
    stats.loo_atoms = {metric: [] for metric in jackknife}
    return {
        name: _sample_hook(
            stats, name, param, mean_grads[name], num_samples, jackknife, want_fisher
        )
        for name, param in params.items()
    }


def _stored_per_window(
    records: list[_Record],
    layer_stats: list[LayerStats],
    weights: list[dict[str, torch.Tensor]],
    jackknife: dict[str, IndexFn],
    want_fisher: bool,
    buffer_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Every gradient from the first pass's kept activations, layer by layer:
    each window's own (``N * dY_i^T X_i``, one batched product per batch),
    their sum (the mean gradient, returned), the per-batch element-wise atoms,
    the input moments, and what each window's gradient adds
    (:func:`_window_terms`, one window at a time: its tensors stay in cache)."""
    mean_grads = []
    # one reused output for every projection (the largest's size): a fresh
    # (windows, out, in) tensor per projection would be paged in anew each time
    buffer = torch.empty(buffer_size)
    for record, stats, layer_weights in zip(records, layer_stats, weights, strict=True):
        inputs, out_grads = record.take()
        batch_sizes = [x.shape[0] for x in inputs["attn"]]
        num_samples = sum(batch_sizes)
        head_dim = stats.shape.head_dim
        # the first pass weighted each window by 1/N: N dY_i is window i's own
        for d_outs in out_grads.values():
            for d_out in d_outs:
                d_out.mul_(num_samples)
        means = {}
        stats.batch_element_atoms = [{} for _ in batch_sizes]
        stats.loo_atoms = {m: [{} for _ in range(num_samples)] for m in jackknife}
        for name, weight in layer_weights.items():
            d_outs = out_grads[name.removesuffix("_bias")]
            if name.endswith("_bias"):
                per_window = torch.cat([d.sum(1) for d in d_outs])
            else:
                xs = inputs[_INPUT_OF[name]]
                shape = (num_samples, d_outs[0].shape[-1], xs[0].shape[-1])
                per_window = buffer[: math.prod(shape)].view(shape)
                for d_out, x, out in zip(
                    d_outs, xs, per_window.split(batch_sizes), strict=True
                ):
                    torch.bmm(d_out.transpose(1, 2), x, out=out)
            total = per_window.sum(0)
            means[name] = total / num_samples
            for atoms, batch in zip(
                stats.batch_element_atoms, per_window.split(batch_sizes), strict=True
            ):
                # this batch's share of the mean gradient, as autograd's hook
                # of the second-pass mode sees it
                share = batch.sum(0).div_(num_samples)
                add_atoms(atoms, name, element1_index(name, weight, share), head_dim)
            for i in range(num_samples):
                terms = _window_terms(
                    stats,
                    name,
                    weight,
                    per_window[i],
                    total,
                    num_samples,
                    jackknife,
                    want_fisher,
                )
                for metric, per_index in terms.items():
                    add_atoms(stats.loo_atoms[metric][i], name, per_index, head_dim)
        mean_grads.append(means)
        # input moments per window (float64, one window at a time, as the
        # second pass records them), and their sums over windows
        stats.sample_inputs = []
        for o_in, down_in in zip(
            (x for batch in inputs["o"] for x in batch),
            (x for batch in inputs["down"] for x in batch),
            strict=True,
        ):
            stats.sample_inputs.append({})
            stats.add_sample_input("o", o_in)
            stats.add_sample_input("down", down_in)
        stats.total_window_inputs()
        del inputs, out_grads
        stats.close_windows(num_samples, bool(jackknife))
    return mean_grads


def _per_window_pass(
    model: nn.Module,
    windows: torch.Tensor,
    layers: list[nn.Module],
    layer_stats: list[LayerStats],
    params_per_layer: list[dict[str, nn.Parameter]],
    grads: list[dict[str, torch.Tensor]],
    jackknife: dict[str, IndexFn],
    want_fisher: bool,
    progress: bool,
) -> None:
    num_samples = windows.shape[0]
    handles = []
    for layer, stats, params, mean_grads in zip(
        layers, layer_stats, params_per_layer, grads, strict=True
    ):
        hooks = _window_hooks(
            stats, params, mean_grads, num_samples, jackknife, want_fisher
        )
        handles += [params[name].register_hook(hook) for name, hook in hooks.items()]
        if jackknife:
            handles += _input_hooks(layer, stats.add_sample_input)
    try:
        for window in tqdm(
            windows.split(1), desc="per-window pass", disable=not progress
        ):
            for stats in layer_stats:
                stats.open_window()
            model(input_ids=window, labels=window).loss.backward()
            for params in params_per_layer:
                for p in params.values():
                    p.grad = None
    finally:
        for handle in handles:
            handle.remove()
    for stats in layer_stats:
        stats.close_windows(num_samples, bool(jackknife))

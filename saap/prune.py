"""Physical pruning: replay a plan on a base model to get a smaller dense model.

Model surgery derives every size from tensor shapes, slices q/k/v/o and
gate/up/down together, and builds a ``SaapLlamaForCausalLM`` whose config records
each layer's sizes. Replaying the same plan on the same base gives bit-identical
weights; a plan that keeps everything gives the base model's logits.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from saap.compensation import (
    InputGram,
    head_rows,
    least_squares_refit,
    plan_grams,
    sequential_refit,
)
from saap.errors import PruningError
from saap.model import LayerShape, decoder_layers, layer_shapes, to_saap_config
from saap.modeling_saap_llama import SaapLlamaForCausalLM

if TYPE_CHECKING:
    from saap.params import PruneParams
    from saap.plan import LayerPlan, Plan

log = logging.getLogger(__name__)


def check_layer_plan(entry: LayerPlan, shape: LayerShape, index: int) -> None:
    """The plan entry must fit the layer it is replayed on."""
    heads, kv = entry.kept_heads, entry.kept_kv_heads
    channels = entry.kept_channels
    problems = []
    if not heads or not kv or not channels:
        problems.append("keeps no head, kv head or channel")
    if heads and max(heads) >= shape.num_heads:
        problems.append(f"head {max(heads)} >= {shape.num_heads} heads")
    if kv and max(kv) >= shape.num_kv_heads:
        problems.append(f"kv head {max(kv)} >= {shape.num_kv_heads} kv heads")
    if channels and max(channels) >= shape.intermediate_size:
        problems.append(f"channel {max(channels)} >= {shape.intermediate_size}")
    if kv and len(heads) % len(kv):
        problems.append(f"{len(heads)} heads not divisible by {len(kv)} kv heads")
    if kv and heads:
        groups = {h // shape.group_size for h in heads}
        if not groups <= set(kv):
            problems.append("keeps a query head whose kv head is removed")
    if problems:
        raise PruningError(
            f"plan layer {index} does not fit the model: {'; '.join(problems)}; the "
            "plan was made for another model, re-run the ranking stage on this one"
        )


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous())
    return layer


@torch.no_grad()
def prune_model(
    model: PreTrainedModel,
    plan: Plan,
    input_means: list[dict[str, torch.Tensor]] | None = None,
    grams: dict[int, dict[str, InputGram]] | None = None,
    bias_for_cut: bool = False,
) -> SaapLlamaForCausalLM:
    """A new, smaller model with the plan's heads and channels kept.

    With ``input_means`` (mean inputs of o_proj and down_proj on calibration data)
    the removed input channels are compensated by a bias (FLAP): ``b += W[:, removed]
    @ mean[removed]``. With ``grams`` (:func:`saap.compensation.input_grams` of
    the plan's layers) the kept columns and the bias are refitted by ridge least
    squares instead (``plan.ridge``; saap/compensation.py). With
    ``bias_for_cut`` every projection that loses input channels gets a bias
    (zero where it had none), for a refit that follows.
    """
    shapes = layer_shapes(model)
    if len(plan.layers) != len(shapes):
        raise PruningError(
            f"plan has {len(plan.layers)} layers, the model {len(shapes)}; the plan "
            "was made for another model, re-run the ranking stage on this one"
        )
    new_shapes: list[LayerShape] = []
    new_layers: list[dict[str, nn.Linear]] = []
    kept_layers: list[int] = []
    for index, (layer, shape, entry) in enumerate(
        zip(decoder_layers(model), shapes, plan.layers, strict=True)
    ):
        if entry.removed:
            continue
        check_layer_plan(entry, shape, index)
        kept_layers.append(index)
        attn, mlp = layer.self_attn, layer.mlp
        hd = shape.head_dim
        q_rows = head_rows(entry.kept_heads, hd)
        kv_rows = head_rows(entry.kept_kv_heads, hd)
        channels = torch.as_tensor(entry.kept_channels, dtype=torch.long)

        def rows(linear: nn.Linear, index_rows: torch.Tensor) -> nn.Linear:
            bias = linear.bias[index_rows] if linear.bias is not None else None
            return _new_linear(linear.weight[index_rows], bias)

        def columns(
            linear: nn.Linear,
            kept: torch.Tensor,
            mean: torch.Tensor | None,
            gram: InputGram | None = None,
        ) -> nn.Linear:
            if gram is not None and len(kept) < linear.weight.shape[1]:
                weight, bias = least_squares_refit(
                    linear.weight, linear.bias, kept, gram, plan.ridge or 1.0
                )
                return _new_linear(weight, bias)
            bias = linear.bias.clone() if linear.bias is not None else None
            cut = len(kept) < linear.weight.shape[1]
            if bias is None and bias_for_cut and cut:
                bias = torch.zeros(linear.weight.shape[0], dtype=linear.weight.dtype)
            if mean is not None:
                removed = torch.ones(linear.weight.shape[1], dtype=torch.bool)
                removed[kept] = False
                shift = linear.weight[:, removed].float() @ mean[removed].float()
                bias = shift.to(linear.weight.dtype) if bias is None else bias + shift
            return _new_linear(linear.weight[:, kept], bias)

        layer_grams = (grams or {}).get(index, {})
        o_mean = input_means[index]["o"] if input_means else None
        down_mean = input_means[index]["down"] if input_means else None
        modules = {
            "q_proj": rows(attn.q_proj, q_rows),
            "k_proj": rows(attn.k_proj, kv_rows),
            "v_proj": rows(attn.v_proj, kv_rows),
            "o_proj": columns(attn.o_proj, q_rows, o_mean, layer_grams.get("o")),
            "gate_proj": rows(mlp.gate_proj, channels),
            "up_proj": rows(mlp.up_proj, channels),
            "down_proj": columns(
                mlp.down_proj, channels, down_mean, layer_grams.get("down")
            ),
        }
        new_layers.append(modules)
        new_shapes.append(
            LayerShape(
                num_heads=len(entry.kept_heads),
                num_kv_heads=len(entry.kept_kv_heads),
                head_dim=hd,
                intermediate_size=len(entry.kept_channels),
                hidden_size=shape.hidden_size,
                qkv_bias=shape.qkv_bias,
                o_bias=modules["o_proj"].bias is not None,
                mlp_bias=shape.mlp_bias,
                down_bias=modules["down_proj"].bias is not None,
            )
        )
    config = to_saap_config(model.config, new_shapes)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = SaapLlamaForCausalLM(config)
    if not kept_layers:
        raise PruningError("the plan removes every decoder layer; lower the ratio")
    # layers are renumbered when whole layers are removed
    new_index = {old: new for new, old in enumerate(kept_layers)}
    state = {}
    for key, value in model.state_dict().items():
        if ".self_attn." in key or ".mlp." in key:
            continue
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old not in new_index:
                continue
            key = key.replace(
                f"model.layers.{old}.", f"model.layers.{new_index[old]}.", 1
            )
        state[key] = value
    for index, modules in enumerate(new_layers):
        for name, linear in modules.items():
            part = (
                "self_attn"
                if name in ("q_proj", "k_proj", "v_proj", "o_proj")
                else "mlp"
            )
            state[f"model.layers.{index}.{part}.{name}.weight"] = linear.weight.data
            if linear.bias is not None:
                state[f"model.layers.{index}.{part}.{name}.bias"] = linear.bias.data
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    missing = [
        k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    # rotary inv_freq is a non-persistent buffer: rebuild it off the meta device
    if missing or unexpected:
        raise PruningError(
            f"pruned state does not match: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    pruned.tie_weights()
    rotary = pruned.model.rotary_emb
    rebuilt = type(rotary)(config=config)
    pruned.model.rotary_emb = rebuilt
    pruned.to(dtype)
    pruned.eval()
    return pruned


def record_compensation(plan: Plan, params: PruneParams) -> None:
    """Write the prune section's compensation settings into ``plan``, where
    :func:`prune_compensated` (the prune stage) reads them."""
    plan.bias_compensation = params.bias_compensation
    plan.least_squares = params.least_squares or None
    plan.ridge = params.ridge if params.least_squares else None
    plan.least_squares_inputs = (
        params.least_squares_inputs if params.least_squares else None
    )
    sequential = params.least_squares and params.least_squares_inputs != "dense"
    plan.ridge_grid = (
        list(params.ridge_grid) if sequential and params.ridge_grid else None
    )


def prune_compensated(
    model: PreTrainedModel,
    plan: Plan,
    windows: torch.Tensor | None = None,
    input_means: list[dict[str, torch.Tensor]] | None = None,
    holdout: torch.Tensor | None = None,
) -> SaapLlamaForCausalLM:
    """The plan replayed on ``model`` with the compensation the plan records:
    FLAP's bias (``input_means``, from the importance statistics), or the
    least-squares refit on the calibration ``windows``, fitted on the dense
    model's inputs or, with ``least_squares_inputs: pruned``, layer after layer
    on the pruned model's own (saap/compensation.py); a plan with a
    ``ridge_grid`` also needs the held-back calibration windows (``holdout``)."""
    if not plan.least_squares:
        means = input_means if plan.bias_compensation else None
        if plan.bias_compensation and means is None:
            raise PruningError(
                "the plan asks for bias compensation, which needs the importance "
                "statistics' input means: pass the importance artifacts"
            )
        return prune_model(model, plan, means)
    if windows is None:
        raise PruningError(
            "the plan asks for least-squares compensation, which needs the "
            "calibration windows: pass them (the prune stage: --calibration "
            "data/calibration)"
        )
    ridge = plan.ridge or 1.0
    inputs = plan.least_squares_inputs or "dense"
    if inputs == "dense":
        return prune_model(model, plan, None, plan_grams(model, plan, windows))
    targets = {"pruned": "self", "pruned_to_dense": "dense"}
    if inputs not in targets:
        raise PruningError(
            f"least_squares_inputs {inputs!r} is not known; use 'dense', 'pruned' "
            "or 'pruned_to_dense'"
        )
    if plan.ridge_grid and (holdout is None or not len(holdout)):
        raise PruningError(
            f"prune.ridge_grid {plan.ridge_grid} chooses each ridge on held-back "
            "windows and none were given: set calibration.holdout_samples > 0 (and "
            "pass them), or set prune.ridge_grid: null"
        )
    pruned = prune_model(model, plan, bias_for_cut=True)
    report = sequential_refit(
        model,
        pruned,
        plan,
        windows,
        ridge,
        targets[inputs],
        plan.ridge_grid,
        holdout if plan.ridge_grid else None,
    )
    if report:
        log.info(
            "sequential refit of %d projections: relative error %.4f -> %.4f "
            "(mean); ridges used %s",
            len(report),
            sum(r["error_before"] for r in report) / len(report),
            sum(r["error_after"] for r in report) / len(report),
            dict(Counter(r["ridge"] for r in report)),
        )
    return pruned

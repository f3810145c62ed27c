"""The registry of recovery methods (:data:`RECOVERIES`), named by
``finetune.method``.

A recovery method turns a pruned model into a recovered one; every method here
trains on transformers' ``Trainer`` (saap/finetune.py). Adding one is a class with
``name``, ``needs_plan`` and ``run(...) -> (trained model, TrainResult)``,
registered with ``RECOVERIES.add``, plus its test:

- ``lora``: LLM-Pruner's recipe, one LoRA rank ``r`` on every projection of
  every layer;
- ``group``: SAAP group fine-tuning. The decoder layers are split into
  ``num_groups`` groups by the plan's per-layer pruning ratio (most pruned
  first); each group gets a LoRA rank proportional to its mean pruning ratio,
  scaled so the adapters have the same total rank (and so about the same
  trainable parameters) as plain LoRA. Capacity goes where the pruning did its
  damage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from saap.errors import PruningError
from saap.finetune import TARGET_MODULES, train_lora
from saap.params import FinetuneParams
from saap.registry import Registry

if TYPE_CHECKING:
    from saap.plan import Plan

RECOVERIES: Registry = Registry("recovery", "saap/recovery.py registers them")


def group_ranks(ratios: list[float], base_rank: int, num_groups: int) -> dict[int, int]:
    """LoRA rank per layer of the pruned model from each layer's pruning ratio
    (SAAP group fine-tuning; see the module docstring)."""
    order = sorted(range(len(ratios)), key=lambda i: -ratios[i])  # most pruned first
    # contiguous slices of that order: group 0 holds the most pruned layers
    groups = [
        order[len(order) * g // num_groups : len(order) * (g + 1) // num_groups]
        for g in range(num_groups)
    ]
    means = [sum(ratios[i] for i in group) / max(len(group), 1) for group in groups]
    total_rank = base_rank * len(ratios)
    weight = sum(m * len(g) for m, g in zip(means, groups, strict=True))
    ranks: dict[int, int] = {}
    for group, mean in zip(groups, means, strict=True):
        rank = 1 if weight == 0 else max(1, round(total_rank * mean / weight))
        for index in group:
            ranks[index] = rank if mean > 0 else 1
    return ranks


class LoraRecovery:
    """LoRA on every projection (LLM-Pruner), merged afterwards."""

    name = "lora"
    needs_plan = False

    def rank_pattern(self, params: FinetuneParams, plan: Plan | None) -> dict:
        return {}

    def run(
        self,
        model,
        tokenizer,
        train_records: list[dict],
        val_records: list[dict],
        params: FinetuneParams,
        resume_dir: Path,
        plan: Plan | None = None,
        callbacks: list | None = None,
        progress: bool = True,
    ):
        if self.needs_plan and plan is None:
            raise PruningError(
                f"{self.name} fine-tuning needs the pruning plan (--plan)"
            )
        return train_lora(
            model,
            tokenizer,
            train_records,
            val_records,
            params,
            resume_dir,
            rank_pattern=self.rank_pattern(params, plan),
            callbacks=callbacks,
            progress=progress,
        )


class GroupRecovery(LoraRecovery):
    """SAAP group fine-tuning: LoRA ranks by layer group (module docstring)."""

    name = "group"
    needs_plan = True

    def rank_pattern(self, params: FinetuneParams, plan: Plan | None) -> dict:
        ranks = group_ranks(
            [layer.ratio for layer in plan.kept_layers()],  # removed ones are gone
            params.lora_r,
            params.num_groups,
        )
        pattern: dict[str, int] = {}
        for index, rank in ranks.items():
            for module in TARGET_MODULES:
                part = "self_attn" if module[0] in "qkvo" else "mlp"
                pattern[f"model.layers.{index}.{part}.{module}"] = rank
        return pattern


RECOVERIES.add(LoraRecovery.name, LoraRecovery())
RECOVERIES.add(GroupRecovery.name, GroupRecovery())


def recover(
    model, tokenizer, train_records, val_records, params, resume_dir, *args, **kw
):
    """Run the recovery method ``params.method`` (arguments as its ``run``);
    returns (trained model, TrainResult)."""
    method = RECOVERIES.get(params.method)
    return method.run(
        model, tokenizer, train_records, val_records, params, resume_dir, *args, **kw
    )

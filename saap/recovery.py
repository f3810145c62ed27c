"""The registry of recovery methods (:data:`RECOVERIES`), named by
``finetune.method``.

A recovery method turns a pruned model into a recovered one; every method here
trains on transformers' ``Trainer`` (saap/finetune.py). Adding one is a class with
``name``, ``needs_plan``, ``default_learning_rate`` and
``run(model, tokenizer, data, params, resume_dir, plan, ...) -> (trained model,
TrainResult)``, registered with ``RECOVERIES.add``, plus its test:

- ``lora``: LLM-Pruner's recipe, one LoRA rank ``r`` on every projection of
  every layer, on the instruction sample;
- ``group_lora``: LoRA with ranks by layer group. The decoder layers are split
  into ``num_groups`` groups by the plan's per-layer pruning ratio (most pruned
  first); each group gets a LoRA rank proportional to its mean pruning ratio,
  scaled so the adapters have the same total rank (and so about the same
  trainable parameters) as plain LoRA;
- ``kd``: distillation from the dense model (saap/distill.py) on plain text no
  evaluation uses, every weight trained (or LoRA adapters with ``kd_lora``);
  with ``kd_topk`` the teacher's top-k probabilities are computed once per
  teacher and window set and cached, so a later run on the same windows (another
  ratio, seed or method) never runs the teacher;
- ``group``: SAAP group fine-tuning as block-wise distillation: groups of layers
  by the layer ranking, recovered one after another to reproduce the dense
  model's hidden states, then a global logit distillation
  (:class:`BlockDistillRecovery`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saap.errors import DataError, PruningError
from saap.finetune import (
    TARGET_MODULES,
    alpaca_prompt,
    fingerprint,
    lora_config,
    run_trainer,
    train_lora,
)
from saap.params import FinetuneParams
from saap.registry import Registry

if TYPE_CHECKING:
    from saap.plan import Plan

log = logging.getLogger(__name__)

RECOVERIES: Registry = Registry("recovery", "saap/recovery.py registers them")


@dataclass
class RecoveryData:
    """What a recovery may train on: the instruction records (split into
    training and validation), the plain-text corpora folder, the evaluation
    records (their text is cut out of distillation text) and a loader of the
    dense teacher model (the last three needed by distillation only)."""

    train_records: list[dict] = field(default_factory=list)
    val_records: list[dict] = field(default_factory=list)
    text_dir: Path | None = None
    eval_dir: Path | None = None  # zero-shot task records, kept out of training
    teacher: object | None = None  # () -> model, or a model
    teacher_text_dir: Path | None = None  # the dense model's samples (kd_corpora)
    cache_dir: Path | None = None  # teacher top-k targets; None: the download cache

    def load_teacher(self):
        if self.teacher is None:
            raise DataError(
                "distillation needs the dense teacher model (--teacher models/base)"
            )
        if isinstance(self.teacher, torch.nn.Module):
            return self.teacher
        return self.teacher()


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
    default_learning_rate = 1e-4
    val_loss = "LM loss on held-out instruction records (nats/token)"

    def rank_pattern(self, params: FinetuneParams, plan: Plan | None) -> dict:
        return {}

    def in_domain(self, params: FinetuneParams) -> list[str]:
        """Evaluation corpora whose own domain this recovery trains on: none
        (the instruction sample is no evaluation's domain)."""
        return []

    def run(
        self,
        model,
        tokenizer,
        data: RecoveryData,
        params: FinetuneParams,
        resume_dir: Path,
        plan: Plan | None = None,
        callbacks: list | None = None,
        progress: bool = True,
    ):
        return train_lora(
            model,
            tokenizer,
            data.train_records,
            data.val_records,
            params,
            resume_dir,
            rank_pattern=self.rank_pattern(params, plan),
            callbacks=callbacks,
            progress=progress,
        )


class GroupLoraRecovery(LoraRecovery):
    """LoRA ranks by layer group (module docstring): the earlier reading of
    SAAP's group fine-tuning, kept for comparison."""

    name = "group_lora"
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


class DistillRecovery:
    """Logit distillation from the dense model (Minitron's recovery), every
    weight trained, or LoRA adapters with ``kd_lora``."""

    name = "kd"
    needs_plan = False
    # best of 5e-5 / 1e-4 / 2e-4 / 4e-4 on the held-out distillation windows'
    # KL (and on PTB) at 40k tokens, 20% SAAP (docs/bench_recovery_topk.md)
    default_learning_rate = 2e-4
    val_loss = (
        "distillation loss on held-out windows (KL(dense || student), "
        "nats/token, when kd_alpha is 1)"
    )

    def in_domain(self, params: FinetuneParams) -> list[str]:
        """Evaluation corpora made in-domain by the distillation text
        (``ptb_train`` makes PTB test in-domain)."""
        from saap.data import in_domain_corpora

        return in_domain_corpora(params.kd_corpora)

    def windows(self, tokenizer, data: RecoveryData, params: FinetuneParams):
        """Packed, decontaminated training and validation windows."""
        from saap.distill import (
            decontaminate,
            distillation_documents,
            evaluation_texts,
            pack,
            split_windows,
        )

        torch.manual_seed(params.seed)
        instruct = [
            alpaca_prompt(r) + r["output"]
            for r in [*data.train_records, *data.val_records]
        ]
        documents = distillation_documents(
            data.text_dir, params.kd_corpora, instruct, data.teacher_text_dir
        )
        documents, cut = decontaminate(
            documents, evaluation_texts(data.text_dir, data.eval_dir)
        )
        if cut:
            log.info("cut %d words shared with evaluation text (13-grams)", cut)
        windows = pack(tokenizer, documents, params.cutoff_len)
        train, val = split_windows(windows, params.kd_val_windows, params.seed)
        if params.max_steps is not None:
            # the windows the step budget reaches (the split is already a seeded
            # shuffle): the trainer sees exactly the windows a teacher cache holds
            train = train[: params.max_steps * params.batch_size]
        log.info(
            "distillation text: %d windows of %d tokens (%d for training, %d held out)",
            len(windows),
            params.cutoff_len,
            len(train),
            len(val),
        )
        return train, val

    def targets(self, teacher, train, val, params: FinetuneParams, cache_dir):
        """The teacher's top-k targets of the training and validation windows
        (one cached file for both), or (None, None) for full-logit distillation."""
        if params.kd_topk is None:
            return None, None
        from saap.distill import teacher_targets
        from saap.sources import default_cache_dir

        started = time.perf_counter()
        targets = teacher_targets(
            teacher,
            torch.cat([train, val]),
            params.kd_topk,
            params.kd_temperature,
            cache_dir or default_cache_dir(),
        )
        log.info(
            "teacher top-%d targets of %d windows %s in %.1f s",
            params.kd_topk,
            len(train) + len(val),
            "computed" if targets.computed else "read from the cache",
            time.perf_counter() - started,
        )
        rows = torch.arange(len(train) + len(val))
        return targets.rows(rows[: len(train)]), targets.rows(rows[len(train) :])

    def distill(
        self,
        model,
        teacher,
        train,
        val,
        params: FinetuneParams,
        resume_dir: Path,
        callbacks: list | None = None,
        progress: bool = True,
        cache_dir: Path | None = None,
    ):
        """Logit distillation of ``model`` from ``teacher`` on the windows."""
        from saap.distill import (
            WindowDataset,
            collate_windows,
            compiled_decoder_kernels,
            distill_trainer_class,
            frozen_token_embeddings,
        )

        key = fingerprint(params, [train.flatten().tolist()], model)
        train_targets, val_targets = self.targets(
            teacher, train, val, params, cache_dir
        )
        with (
            frozen_token_embeddings(model, params.kd_freeze_embedding),
            compiled_decoder_kernels(model, teacher),
        ):
            return run_trainer(
                model,
                params,
                resume_dir,
                key,
                WindowDataset(train, train_targets),
                WindowDataset(val, val_targets),
                collate_windows,
                callbacks,
                progress,
                trainer_class=distill_trainer_class(),
                trainer_kwargs={
                    "teacher": teacher,
                    "temperature": params.kd_temperature,
                    "alpha": params.kd_alpha,
                },
                args_overrides={
                    # packed windows: every token counts, there is no padding
                    "include_num_input_tokens_seen": "all",
                    "optim": "adamw_torch_fused",
                },
            )

    def run(
        self,
        model,
        tokenizer,
        data: RecoveryData,
        params: FinetuneParams,
        resume_dir: Path,
        plan: Plan | None = None,
        callbacks: list | None = None,
        progress: bool = True,
    ):
        train, val = self.windows(tokenizer, data, params)
        if params.kd_lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(params))
        teacher = data.load_teacher()
        return self.distill(
            model,
            teacher,
            train,
            val,
            params,
            resume_dir,
            callbacks,
            progress,
            data.cache_dir,
        )


def layer_groups(plan: Plan, num_groups: int) -> list[list[int]]:
    """Positions of the pruned model's layers split into ``num_groups`` groups by
    the layer ranking (least important first; by pruning ratio, most pruned
    first, where the allocation kept no ranking)."""
    kept = plan.kept_layers()

    def damage(position: int) -> tuple[float, float]:
        layer = kept[position]
        importance = layer.layer_importance
        return (-layer.ratio if importance is None else importance, -layer.ratio)

    order = sorted(range(len(kept)), key=damage)
    groups = [
        sorted(order[len(order) * g // num_groups : len(order) * (g + 1) // num_groups])
        for g in range(num_groups)
    ]
    return [g for g in groups if g]


class BlockDistillRecovery(DistillRecovery):
    """SAAP group fine-tuning as block-wise distillation: the layers are split
    into groups by the layer ranking; one group after another (least important,
    i.e. most pruned, first) trains only its own layers so that each layer's
    output hidden state, computed from the student's own input, matches the
    dense model's at the same depth (mean squared error relative to the dense
    state's mean square); then every weight is trained by logit distillation.
    ``block_share`` of the step budget goes to the groups, split evenly."""

    name = "group"
    needs_plan = True
    default_learning_rate = 5e-5  # as measured in docs/bench_recovery.md
    block_share = 0.5
    val_loss = (
        "last phase (global distillation): KL(dense || student) on held-out "
        "windows, nats/token, when kd_alpha is 1"
    )

    def run(
        self,
        model,
        tokenizer,
        data: RecoveryData,
        params: FinetuneParams,
        resume_dir: Path,
        plan: Plan | None = None,
        callbacks: list | None = None,
        progress: bool = True,
    ):
        from saap.distill import (
            WindowDataset,
            block_trainer_class,
            collate_windows,
            compiled_decoder_kernels,
        )
        from saap.finetune import TrainResult

        if params.kd_lora:
            raise PruningError(
                "group recovery trains whole layers; set finetune.kd_lora to false "
                "or use finetune.method: kd"
            )
        train, val = self.windows(tokenizer, data, params)
        teacher = data.load_teacher()
        total = params.max_steps or max(
            1, len(train) * params.epochs // params.batch_size
        )
        groups = layer_groups(plan, params.num_groups)
        per_group = max(1, round(total * self.block_share / len(groups)))
        final = max(1, total - per_group * len(groups))
        teacher_layers = [layer.index for layer in plan.kept_layers()]
        results = []
        for number, group in enumerate(groups):
            model.requires_grad_(False)
            for position in group:
                model.model.layers[position].requires_grad_(True)
            phase = _phase_params(params, per_group)
            key = fingerprint(
                phase, [train.flatten().tolist(), [number, *group]], model
            )
            log.info(
                "group %d/%d: layers %s, %d steps of block-wise distillation",
                number + 1,
                len(groups),
                group,
                per_group,
            )
            with compiled_decoder_kernels(model, teacher):
                model, result = run_trainer(
                    model,
                    phase,
                    resume_dir,
                    key,
                    WindowDataset(train),
                    WindowDataset(val),
                    collate_windows,
                    callbacks,
                    progress,
                    trainer_class=block_trainer_class(),
                    trainer_kwargs={
                        "teacher": teacher,
                        "pairs": [(p, teacher_layers[p]) for p in group],
                    },
                    args_overrides={
                        "include_num_input_tokens_seen": "all",
                        "optim": "adamw_torch_fused",
                    },
                )
            results.append(result)
        model.requires_grad_(True)
        log.info("global distillation: %d steps", final)
        model, result = self.distill(
            model,
            teacher,
            train,
            val,
            _phase_params(params, final),
            resume_dir,
            callbacks,
            progress,
            data.cache_dir,
        )
        results.append(result)
        offset = sum(r.steps for r in results[:-1])
        seconds = sum(r.seconds for r in results)
        tokens = sum(r.tokens for r in results)
        return model, TrainResult(
            steps=offset + result.steps,
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / max(seconds, 1e-9),
            train_losses=[loss for r in results for loss in r.train_losses],
            val_losses={offset + s: v for s, v in result.val_losses.items()},
            best_step=offset + result.best_step,
            truncated=0,
            resumed_from=results[0].resumed_from,
            trainable_params=sum(p.numel() for p in model.parameters()),
            history=[entry for r in results for entry in r.history],
        )


def _phase_params(params: FinetuneParams, steps: int) -> FinetuneParams:
    """``params`` for one phase of ``steps`` optimizer steps (validated and saved
    at least at its end)."""
    every = min(params.eval_steps, steps)
    return params.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": min(params.warmup_steps, steps // 2),
            "eval_steps": every,
            "save_steps": every,
        }
    )


RECOVERIES.add(LoraRecovery.name, LoraRecovery())
RECOVERIES.add(GroupLoraRecovery.name, GroupLoraRecovery())
RECOVERIES.add(DistillRecovery.name, DistillRecovery())
RECOVERIES.add(BlockDistillRecovery.name, BlockDistillRecovery())


def recover(
    model,
    tokenizer,
    data: RecoveryData,
    params: FinetuneParams,
    resume_dir: Path,
    plan: Plan | None = None,
    **options,
):
    """Run the recovery method ``params.method`` (``options``: ``callbacks``,
    ``progress``); returns (trained model, TrainResult). A null learning rate
    becomes the method's own."""
    method = RECOVERIES.get(params.method)
    if method.needs_plan and plan is None:
        raise PruningError(f"{method.name} recovery needs the pruning plan (--plan)")
    if params.learning_rate is None:
        params = params.model_copy(
            update={"learning_rate": method.default_learning_rate}
        )
    return method.run(model, tokenizer, data, params, resume_dir, plan, **options)

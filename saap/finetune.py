"""Recovery fine-tuning of a pruned model with LoRA adapters, merged afterwards.

Two methods share one training loop and one token budget:

- ``lora``: LLM-Pruner's recipe, one LoRA rank ``r`` on every projection of every
  layer;
- ``group``: SAAP group fine-tuning. The decoder layers are split into
  ``num_groups`` groups by the plan's per-layer pruning ratio (most pruned first);
  each group gets a LoRA rank proportional to its mean pruning ratio, scaled so
  the adapters have the same total rank (and so about the same trainable
  parameters) as plain LoRA. Capacity goes where the pruning did its damage.

Training runs under bfloat16 autocast with float32 master weights where the
hardware has native bfloat16 (AMX, AVX512-BF16, CUDA), in float32 elsewhere. A
resume checkpoint (adapters, optimizer, scheduler, RNG state, best validation)
is written every ``save_steps``; a rerun with the same settings continues from
it. The adapters of the best validation step are merged into the weights, so the
saved model has no adapter modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saap.errors import DataError, PruningError
from saap.model import layer_shapes, native_bfloat16
from saap.params import FinetuneParams

log = logging.getLogger(__name__)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def alpaca_prompt(record: dict) -> str:
    """The Alpaca prompt of a record (LLM-Pruner's template)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(
        instruction=record["instruction"], input=record.get("input", "")
    )


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_records(
    tokenizer, records: list[dict], cutoff_len: int, train_on_inputs: bool
) -> tuple[list[Example], int]:
    """Tokenize prompt + response + EOS, cut at ``cutoff_len``; count the cut ones."""
    examples, truncated = [], 0
    for record in records:
        prompt = alpaca_prompt(record)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + record["output"], add_special_tokens=False)[
            "input_ids"
        ]
        full_ids = full_ids + [tokenizer.eos_token_id]
        if len(full_ids) > cutoff_len:
            truncated += 1
            full_ids = full_ids[:cutoff_len]
        labels = list(full_ids)
        if not train_on_inputs:
            masked = min(len(prompt_ids), len(labels))
            labels[:masked] = [-100] * masked
        examples.append(Example(full_ids, labels))
    return examples, truncated


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded labels are ignored (-100)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def split_records(records: list[dict], val_size: int, seed: int) -> tuple[list, list]:
    """Seeded split into training and held-out validation records."""
    if len(records) <= val_size:
        raise DataError(
            f"{len(records)} instruction records cannot leave {val_size} for "
            "validation; lower finetune.val_size or give more data"
        )
    order = torch.randperm(
        len(records), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    val = [records[i] for i in order[:val_size]]
    train = [records[i] for i in order[val_size:]]
    return train, val


def group_ranks(plan: dict, base_rank: int, num_groups: int) -> dict[int, int]:
    """LoRA rank per layer for SAAP group fine-tuning (see the module docstring)."""
    # layers removed whole are gone from the model; the rest are renumbered
    ratios = [layer["ratio"] for layer in plan["layers"] if not layer.get("removed")]
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


def lora_config(params: FinetuneParams, plan: dict | None):
    """The peft LoraConfig of the chosen method."""
    from peft import LoraConfig

    rank_pattern: dict[str, int] = {}
    if params.method == "group":
        if plan is None:
            raise PruningError("group fine-tuning needs the pruning plan (--plan)")
        for index, rank in group_ranks(plan, params.lora_r, params.num_groups).items():
            for module in TARGET_MODULES:
                part = "self_attn" if module[0] in "qkvo" else "mlp"
                rank_pattern[f"model.layers.{index}.{part}.{module}"] = rank
    return LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(TARGET_MODULES),
        rank_pattern=rank_pattern,
        alpha_pattern={k: 2 * v for k, v in rank_pattern.items()},
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_against_plan(model, plan: dict) -> None:
    """The checkpoint must have the layer sizes the plan produced."""
    shapes = layer_shapes(model)
    kept = [layer for layer in plan["layers"] if not layer.get("removed")]
    if len(shapes) != len(kept):
        raise PruningError(
            f"checkpoint has {len(shapes)} layers, the plan keeps {len(kept)}; "
            "fine-tune the checkpoint the plan produced (re-run the prune stage)"
        )
    for shape, layer in zip(shapes, kept, strict=True):
        got = (shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        want = (layer["num_heads"], layer["num_kv_heads"], layer["intermediate_size"])
        if got != want:
            raise PruningError(
                f"layer {layer['index']} of the checkpoint has (heads, kv heads, MLP) "
                f"{got} but the plan says {want}; fine-tune the checkpoint the plan "
                "produced (re-run the prune stage)"
            )


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_losses: list[float]
    val_losses: dict[int, float]
    best_step: int
    truncated: int
    resumed_from: int
    trainable_params: int
    history: list[dict] = field(default_factory=list)


def fingerprint(params: FinetuneParams, data: list[Example], model) -> str:
    """What a resume checkpoint must match: settings, data and starting weights."""
    digest = hashlib.sha256(params.model_dump_json().encode())
    for example in data:
        digest.update(json.dumps(example.input_ids).encode())
    for tensor in list(model.state_dict().values())[:4]:
        digest.update(tensor.float().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad
    }


@torch.no_grad()
def validation_loss(model, val: list[Example], micro_batch: int, pad_id: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), micro_batch):
        batch = collate(val[start : start + micro_batch], pad_id)
        with torch.autocast("cpu", torch.bfloat16, enabled=native_bfloat16()):
            loss = model(**batch).loss
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(loss) * tokens
        count += tokens
    model.train()
    return total / max(count, 1)


def train_lora(
    model,
    tokenizer,
    train_records: list[dict],
    val_records: list[dict],
    params: FinetuneParams,
    resume_dir: Path,
    plan: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
):
    """Fine-tune ``model`` (float32) with LoRA; return (merged model, result).

    ``stop_after`` ends the run after that many optimizer steps of this call
    without merging (the resume checkpoint stays): it simulates an interruption.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(params.seed)
    train, truncated = tokenize_records(
        tokenizer, train_records, params.cutoff_len, params.train_on_inputs
    )
    val, val_truncated = tokenize_records(
        tokenizer, val_records, params.cutoff_len, params.train_on_inputs
    )
    if truncated + val_truncated:
        log.warning(
            "%d of %d records were longer than cutoff_len %d and were truncated",
            truncated + val_truncated,
            len(train) + len(val),
            params.cutoff_len,
        )
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id
    )
    key = fingerprint(params, train, model)
    peft_model = get_peft_model(model, lora_config(params, plan))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    accumulation = params.batch_size // params.micro_batch_size
    steps_per_epoch = math.ceil(len(train) / params.batch_size)
    total_steps = params.max_steps or params.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=0.0,
    )

    def schedule(step: int) -> float:
        if step < params.warmup_steps:
            return (step + 1) / (params.warmup_steps + 1)
        remaining = max(total_steps - params.warmup_steps, 1)
        return max(0.0, 1 - (step - params.warmup_steps) / remaining)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state_path = resume_dir / f"finetune-{key}.pt"
    start_step, best_val, best_step, best_state = 0, math.inf, 0, None
    train_losses: list[float] = []
    val_losses: dict[int, float] = {}
    tokens_seen = 0
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        set_peft_model_state_dict(peft_model, saved["adapters"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        start_step, best_val, best_step = (
            saved["step"],
            saved["best_val"],
            saved["best_step"],
        )
        best_state = saved["best_state"] or None
        train_losses, tokens_seen = list(saved["train_losses"]), saved["tokens"]
        val_losses = {int(k): v for k, v in saved["val_losses"].items()}
        log.info(
            "resuming fine-tuning at step %d of %d from %s",
            start_step,
            total_steps,
            state_path,
        )

    def batch_indices(step: int) -> list[int]:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(params.seed + epoch)
        ).tolist()
        return order[offset * params.batch_size : (offset + 1) * params.batch_size]

    def save_state(step: int) -> None:
        from peft import get_peft_model_state_dict

        resume_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "adapters": get_peft_model_state_dict(peft_model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
                "best_val": best_val,
                "best_step": best_step,
                "best_state": best_state or {},
                "train_losses": train_losses,
                "tokens": tokens_seen,
                "val_losses": {str(k): v for k, v in val_losses.items()},
            },
            tmp,
        )
        tmp.replace(state_path)

    peft_model.train()
    started = time.perf_counter()
    session_tokens = 0
    bar = tqdm(
        range(start_step, total_steps),
        desc=f"finetune ({params.method})",
        disable=not progress,
        initial=start_step,
        total=total_steps,
    )
    step = start_step
    for step in bar:
        indices = batch_indices(step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for start in range(0, len(indices), params.micro_batch_size):
            micro = collate(
                [train[i] for i in indices[start : start + params.micro_batch_size]],
                pad_id,
            )
            with torch.autocast("cpu", torch.bfloat16, enabled=native_bfloat16()):
                loss = peft_model(**micro).loss / accumulation
            loss.backward()
            step_loss += float(loss.detach())
            session_tokens += int(micro["attention_mask"].sum())
        optimizer.step()
        scheduler.step()
        train_losses.append(step_loss)
        elapsed = time.perf_counter() - started
        bar.set_postfix(
            loss=f"{step_loss:.3f}", tok_s=f"{session_tokens / max(elapsed, 1e-9):.0f}"
        )
        done = step + 1
        if done % params.eval_steps == 0 or done == total_steps:
            val_loss = validation_loss(peft_model, val, params.micro_batch_size, pad_id)
            val_losses[done] = val_loss
            if val_loss < best_val:
                best_val, best_step, best_state = (
                    val_loss,
                    done,
                    adapter_state(peft_model),
                )
        if done % params.save_steps == 0 or done == total_steps:
            save_state(done)
        if stop_after is not None and done - start_step >= stop_after:
            save_state(done)
            return None, None
    tokens_seen += session_tokens
    seconds = time.perf_counter() - started
    peft_model.eval()
    if best_state is not None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name in best_state:
                    param.copy_(best_state[name])
    result = TrainResult(
        steps=total_steps,
        tokens=tokens_seen,
        seconds=seconds,
        tokens_per_s=session_tokens / max(seconds, 1e-9),
        train_losses=train_losses,
        val_losses=val_losses,
        best_step=best_step,
        truncated=truncated + val_truncated,
        resumed_from=start_step,
        trainable_params=trainable,
    )
    return peft_model, result


def merge(peft_model):
    """Fold the adapters into the weights; the result has no adapter modules."""
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged

"""Recovery fine-tuning with LoRA adapters on transformers' ``Trainer``, merged
afterwards.

The recovery methods (``finetune.method``) are registered in saap/recovery.py;
the LoRA ones (``lora``: LLM-Pruner's recipe; ``group``: SAAP's rank per layer
group) differ only in their LoRA rank pattern and share :func:`train_lora`.

Training runs under bfloat16 autocast with float32 master weights where the
hardware has native bfloat16 (AMX, AVX512-BF16, CUDA), in float32 elsewhere
(``TrainingArguments.bf16``). Linear warm-up then linear decay, gradient
accumulation to ``batch_size``, validation every ``eval_steps`` and at the last
step, the adapters of the best validation step restored at the end
(``load_best_model_at_end``). A resume checkpoint (adapters, optimizer,
scheduler, RNG state, trainer state) is written every ``save_steps`` into a
folder keyed by the settings, data and starting weights; a rerun with the same
key continues from its last checkpoint, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saap.errors import DataError, PruningError
from saap.model import layer_shapes, native_bfloat16
from saap.params import FinetuneParams

if TYPE_CHECKING:
    from saap.plan import Plan

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


def lora_config(params: FinetuneParams, rank_pattern: dict[str, int] | None = None):
    """The peft LoraConfig: rank ``lora_r`` on every projection, or the per-module
    ranks of ``rank_pattern`` (module path -> rank; alpha = 2 x rank there)."""
    from peft import LoraConfig

    rank_pattern = rank_pattern or {}
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


def check_against_plan(model, plan: Plan) -> None:
    """The checkpoint must have the layer sizes the plan produced."""
    shapes = layer_shapes(model)
    kept = plan.kept_layers()
    if len(shapes) != len(kept):
        raise PruningError(
            f"checkpoint has {len(shapes)} layers, the plan keeps {len(kept)}; "
            "fine-tune the checkpoint the plan produced (re-run the prune stage)"
        )
    for shape, layer in zip(shapes, kept, strict=True):
        got = (shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        want = (layer.num_heads, layer.num_kv_heads, layer.intermediate_size)
        if got != want:
            raise PruningError(
                f"layer {layer.index} of the checkpoint has (heads, kv heads, MLP) "
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


def fingerprint(params: FinetuneParams, data: list[list[int]], model) -> str:
    """What a resume checkpoint must match: settings, data (token ids) and
    starting weights."""
    digest = hashlib.sha256(params.model_dump_json().encode())
    for ids in data:
        digest.update(json.dumps(ids).encode())
    for tensor in list(model.state_dict().values())[:4]:
        digest.update(tensor.float().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


class _ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _final_step_callback():
    """Validate and save at the last step too (not only every N steps), so the
    best adapters are chosen from every validation the budget allows."""
    from transformers import TrainerCallback

    class FinalStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True
                control.should_save = True
            return control

    return FinalStep()


class _SessionStart:
    """Tokens already seen when this session starts (non-zero after a resume)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        self.tokens_at_start = 0
        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.tokens_at_start = int(state.num_input_tokens_seen)

        self.callback = Callback()


def training_arguments(
    params: FinetuneParams, output_dir: Path, progress: bool, **overrides
):
    """TrainingArguments of the recovery recipe (CPU, bf16 where native)."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=params.micro_batch_size,
        per_device_eval_batch_size=params.micro_batch_size,
        gradient_accumulation_steps=params.batch_size // params.micro_batch_size,
        max_steps=params.max_steps or -1,
        num_train_epochs=params.epochs,
        learning_rate=params.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=params.warmup_steps,
        eval_strategy="steps",
        eval_steps=params.eval_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        bf16=native_bfloat16(),
        use_cpu=not torch.cuda.is_available(),
        seed=params.seed,
        data_seed=params.seed,
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    return TrainingArguments(**(settings | overrides))


def run_trainer(
    model,
    params: FinetuneParams,
    resume_dir: Path,
    key: str,
    train_dataset,
    eval_dataset,
    collator,
    callbacks: list | None = None,
    progress: bool = True,
    trainer_class=None,
    trainer_kwargs: dict | None = None,
    truncated: int = 0,
    args_overrides: dict | None = None,
):
    """Train ``model`` with a ``transformers.Trainer`` (``trainer_class``, default
    the stock one) under :func:`training_arguments`, resuming from the last
    checkpoint under ``resume_dir/finetune-<key>``; returns (model with the best
    validation step's weights, :class:`TrainResult`)."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    output_dir = resume_dir / f"finetune-{key}"
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer = (trainer_class or Trainer)(
        model=model,
        args=training_arguments(params, output_dir, progress, **(args_overrides or {})),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[_final_step_callback(), *(callbacks or [])],
        **(trainer_kwargs or {}),
    )
    session = _SessionStart()
    trainer.add_callback(session.callback)
    resumed_from = 0
    if last is not None:
        resumed_from = int(Path(last).name.split("-")[-1])
        log.info("resuming fine-tuning at step %d from %s", resumed_from, last)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    val_losses = {
        int(entry["step"]): float(entry["eval_loss"])
        for entry in history
        if "eval_loss" in entry
    }
    best_step = min(val_losses, key=lambda s: (val_losses[s], s)) if val_losses else 0
    tokens = int(trainer.state.num_input_tokens_seen)
    # accelerate wraps forward in autocast when training in bf16: take it off, so
    # the returned model computes in its own dtype (as it will after reloading)
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trained.eval()
    result = TrainResult(
        steps=int(trainer.state.global_step),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=(tokens - session.tokens_at_start) / max(seconds, 1e-9),
        train_losses=train_losses,
        val_losses=val_losses,
        best_step=best_step,
        truncated=truncated,
        resumed_from=resumed_from,
        trainable_params=trainable,
    )
    return trained, result


def pad_id_of(tokenizer) -> int:
    return (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id
    )


def train_lora(
    model,
    tokenizer,
    train_records: list[dict],
    val_records: list[dict],
    params: FinetuneParams,
    resume_dir: Path,
    rank_pattern: dict[str, int] | None = None,
    callbacks: list | None = None,
    progress: bool = True,
):
    """Fine-tune ``model`` (float32) with LoRA on instruction records; return
    (peft model with the best validation step's adapters, :class:`TrainResult`).
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (early
    stopping, interruption)."""
    from peft import get_peft_model

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
    pad_id = pad_id_of(tokenizer)
    key = fingerprint(params, [e.input_ids for e in train], model)
    peft_model = get_peft_model(model, lora_config(params, rank_pattern))
    return run_trainer(
        peft_model,
        params,
        resume_dir,
        key,
        _ExampleDataset(train),
        _ExampleDataset(val),
        lambda batch: collate(batch, pad_id),
        callbacks,
        progress,
        truncated=truncated + val_truncated,
    )


def merge(model):
    """Fold LoRA adapters into the weights (the result has no adapter modules);
    a model trained in full is returned as it is."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.eval()
    return merged

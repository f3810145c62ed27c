"""Training throughput of the recovery the pipeline runs: the finetune stage's
own ``recover`` call (transformers Trainer, packed windows, validation and a
checkpoint at the end) on SmolLM2-135M pruned 20% by SAAP (``models/pruned``),
with params.yaml's ``finetune`` section (the make-run profile) cut to
``--steps`` steps, on 2 threads.

Arms, run one after another within each of ``--pairs`` rounds (the order
reversed every other round, so that this machine's drift hits all alike):

- ``default``: the step as the pipeline runs it (compiled KL chunk pass,
  ``saap.distill.fused_kl_rows``; compiled RMSNorm, SiLU gate and rotary,
  ``saap.distill.compiled_decoder_kernels``);
- ``decoder_eager``: the decoders as transformers runs them (the previous
  revision's step);
- ``eager``: nothing compiled (``SAAP_KD_COMPILE=0``).

Each arm's tokens/s is the Trainer's (training tokens over its run time,
validation and checkpoint included, as in the finetune stage's report); each
arm against ``default`` as the geometric mean of the per-round ratios with a
95% t-interval. The first round also pays each arm's compiles (inductor's
cache makes later ones seconds), so it is run untimed first (``--warmup``).

Usage (after ``dvc repro prune``)::

    .venv/bin/python benchmarks/finetune_smollm2.py [--steps 20] [--pairs 4]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import saap.distill as distill
from saap.comparison import seed_ratio
from saap.finetune import split_records
from saap.model import compute_dtype, load_model, native_bfloat16
from saap.params import load_section
from saap.plan import load_plan
from saap.recovery import RecoveryData, recover
from stages.finetune import read_records

ARMS = ("default", "decoder_eager", "eager")


@contextlib.contextmanager
def arm_settings(arm: str):
    """The compile switches of one arm; restored after."""
    env = os.environ.get("SAAP_KD_COMPILE")
    threshold = distill.KERNELS_MIN_PARAMS
    os.environ["SAAP_KD_COMPILE"] = "0" if arm == "eager" else "1"
    if arm == "decoder_eager":
        distill.KERNELS_MIN_PARAMS = float("inf")
    try:
        yield
    finally:
        distill.KERNELS_MIN_PARAMS = threshold
        if env is None:
            os.environ.pop("SAAP_KD_COMPILE", None)
        else:
            os.environ["SAAP_KD_COMPILE"] = env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/pruned"))
    parser.add_argument("--teacher", type=Path, default=Path("models/base"))
    parser.add_argument("--plan", type=Path, default=Path("artifacts/plan/plan.json"))
    parser.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per arm first"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench_finetune.md"))
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "default" not in arms:
        parser.error(
            f"--arms {args.arms!r}: choose from {', '.join(ARMS)}, default included"
        )
    torch.set_num_threads(2)
    base = load_section(args.params, "finetune")
    if base.method not in ("kd", "group"):
        parser.error(
            f"params.yaml finetune.method is {base.method!r}: this benchmark times "
            "the distillation step (kd or group)"
        )
    plan = load_plan(args.plan)
    pruned, tokenizer = load_model(args.model, dtype=torch.float32)
    teacher, _ = load_model(args.teacher, dtype=compute_dtype())
    # the stage's inputs: the instruction records (split as the stage splits
    # them) are part of the distillation text where kd_corpora names instruct
    train, val = split_records(read_records(args.data), base.val_size, base.seed)
    data = RecoveryData(
        train, val, text_dir=args.text, eval_dir=args.eval, teacher=teacher
    )

    def run(arm: str, steps: int) -> dict:
        params = base.model_copy(
            update={
                "max_steps": steps,
                "eval_steps": steps,
                "save_steps": steps,
                "warmup_steps": min(base.warmup_steps, steps),
            }
        )
        with arm_settings(arm), tempfile.TemporaryDirectory() as resume:
            started = time.perf_counter()
            _, result = recover(
                copy.deepcopy(pruned),
                tokenizer,
                data,
                params,
                Path(resume),
                plan,
                progress=False,
            )
            wall = time.perf_counter() - started
        return {
            "tokens": result.tokens,
            "seconds": result.seconds,
            "tokens_per_s": result.tokens_per_s,
            "wall_s": wall,
            "final_train_loss": result.train_losses[-1]
            if result.train_losses
            else None,
        }

    for arm in arms:  # compiles (cached by inductor afterwards), untimed
        run(arm, args.warmup)
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_ in range(args.pairs):
        for arm in arms if round_ % 2 == 0 else list(reversed(arms)):
            rows[arm].append(run(arm, args.steps))
            print(round_, arm, json.dumps(rows[arm][-1]), flush=True)

    rates = {arm: [r["tokens_per_s"] for r in rows[arm]] for arm in arms}
    settings = (
        f"method {base.method}, batch {base.batch_size} x {base.cutoff_len} tokens "
        f"(micro-batch {base.micro_batch_size}), kd_temperature "
        f"{base.kd_temperature}, kd_alpha {base.kd_alpha}, kd_topk {base.kd_topk}, "
        f"kd_freeze_embedding {base.kd_freeze_embedding}, kd_corpora "
        f"{list(base.kd_corpora)}"
    )
    precision = (
        "bf16 autocast, float32 master weights, teacher in bf16"
        if native_bfloat16()
        else "float32: this CPU has no native bf16"
    )
    lines = [
        "# Recovery training throughput (the finetune stage's `recover`)",
        "",
        f"Command: `.venv/bin/python benchmarks/finetune_smollm2.py --steps "
        f"{args.steps} --pairs {args.pairs} --arms {','.join(arms)}`: SmolLM2-135M "
        f"pruned 20% by SAAP (`models/pruned`), params.yaml's `finetune` section "
        f"(the make-run profile: {settings}) cut to {args.steps} steps "
        f"({args.steps * base.batch_size * base.cutoff_len:,} tokens) with one "
        f"validation and checkpoint at the end; 2 threads on {cpu_name()}, "
        f"{precision}. Arms one after another per round, order reversed every "
        f"other round, after {args.warmup} untimed steps per arm. tokens/s: the "
        "Trainer's (its run time, validation and checkpoint included).",
        "",
        "| arm | tokens/s per round | mean | vs default, 95% CI (by round) "
        "| final train loss |",
        "|---|---|---:|---|---:|",
    ]
    for arm in arms:
        per_round = ", ".join(f"{r:.0f}" for r in rates[arm])
        if arm == "default":
            versus = "1"
        elif args.pairs >= 2:
            ratio = seed_ratio(rates[arm], rates["default"])
            versus = f"{ratio.value:.3f}x [{ratio.lower:.3f}, {ratio.upper:.3f}]"
        else:
            mean = statistics.mean(rates[arm]) / statistics.mean(rates["default"])
            versus = f"{mean:.3f}x (1 round)"
        loss = rows[arm][-1]["final_train_loss"]
        lines.append(
            f"| {arm} | {per_round} | {statistics.mean(rates[arm]):.0f} | {versus} "
            f"| {'-' if loss is None else f'{loss:.4f}'} |"
        )
    if args.pairs >= 2:
        for arm in arms:
            if arm == "default":
                continue
            ratio = seed_ratio(rates["default"], rates[arm])
            lines += [
                "",
                f"default against {arm}: {ratio.value:.3f}x [{ratio.lower:.3f}, "
                f"{ratio.upper:.3f}] "
                + (
                    "(separated)"
                    if ratio.lower > 1 or ratio.upper < 1
                    else "(not separated)"
                ),
            ]
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "steps": args.steps, "rows": rows}, indent=1)
        + "\n"
    )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

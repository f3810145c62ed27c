"""Where the time of one distillation step goes, and what each change buys:
training tokens/s of logit distillation (the `kd` recovery) of the 20%-pruned
SmolLM2-135M from the dense model, on packed 256-token windows, 2 threads.

Each variant runs the same optimizer step as the `kd` recovery's Trainer (student
float32 weights under bf16 autocast where the CPU has native bf16, teacher in
the compute dtype without gradients, KL over the full vocabulary in float32,
fused AdamW), timed over ``--steps`` steps after one warm-up step and one
untimed round, variants interleaved round by round so that machine drift hits
all alike. ``default`` is
the Trainer's step: output projections and loss in row chunks
(``saap.distill.chunked_kd_loss``) with each chunk's softmaxes, KL and gradient
in one compiled pass (``saap.distill.fused_kl_rows``), the decoders' RMSNorms,
SiLU gates and rotary embeddings compiled
(``saap.distill.compiled_decoder_kernels``); ``previous`` is the step before
it (those decoder parts eager, as transformers runs them).
``frozen_embeddings`` does not train the
tied embedding and output projection (``finetune.kd_freeze_embedding``). The
cached variants use the recovery's own top-k targets (``finetune.kd_topk``),
held in memory, and its loss in row chunks (``saap.distill.distillation_loss``
with ``teacher_topk``). Then a
torch.profiler table of one step of the default variant, and each variant's
matrix-product FLOPs per step with the tokens/s those products alone would allow
at the rate the profiled step's own products ran (the ceiling of any change that
leaves the arithmetic as it is). The first compile of the chunk step (2-18 s,
then cached by inductor) falls in the warm-up.

Usage (after ``dvc repro prune``)::

    .venv/bin/python benchmarks/kd_throughput.py [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from saap.comparison import seed_ratio
from saap.distill import (
    compiled_decoder_kernels,
    distillation_loss,
    kd_loss,
    teacher_targets,
    topk_kd_loss,
)
from saap.model import compute_dtype, load_model, native_bfloat16


def windows(tokenizer, text_dir: Path, batch: int, seq_len: int) -> torch.Tensor:
    rows = (text_dir / "c4.jsonl").read_text().splitlines()[:400]
    text = "\n\n".join(json.loads(r)["text"] for r in rows)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    count = batch * 8
    return ids[: count * seq_len].view(count, seq_len)


def variant_step(name, student, teacher, optimizer, batch, top_k=64):
    """One optimizer step; returns tokens trained."""
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if native_bfloat16()
        else contextlib.nullcontext()
    )
    if name == "default":  # the Trainer's own loss
        loss, _ = distillation_loss(student, teacher, batch, 1.0, 1.0, lambda: autocast)
    elif name == "cached_topk":
        # finetune.kd_topk with its cache filled, as the Trainer does it: no
        # teacher forward, the KL over the teacher's top-k tokens plus its tail
        # mass, the student's output projection and loss in row chunks
        targets = CACHE[batch.data_ptr()]
        loss, _ = distillation_loss(
            student,
            teacher,
            batch,
            1.0,
            1.0,
            lambda: autocast,
            teacher_topk=(targets.logp, targets.index),
        )
    elif name == "cached_topk_whole_logits":
        # the same loss on the student's whole logits (the step before)
        with autocast:
            s_logits = student(input_ids=batch).logits
        targets = CACHE[batch.data_ptr()]
        loss, _ = topk_kd_loss(
            s_logits[:, :-1], targets.logp, targets.index, None, 1.0, 1.0
        )
    else:  # full_logits
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits
        with autocast:
            s_logits = student(input_ids=batch).logits
        loss, _ = kd_loss(s_logits[:, :-1], t_logits[:, :-1], None, 1.0, 1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch.numel()


CACHE: dict = {}

# the matrix products, as the FLOP counter (aten.mm) and the profiler (aten::mm)
# name them
GEMM_OPS = ("mm", "addmm", "bmm")


def step_flops(run) -> float:
    """FLOPs of the matrix products of one call of ``run`` (an optimizer step), as
    torch's counter counts them (it has no formula for the CPU attention kernel,
    so attention is not in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()["Global"]
    return float(
        sum(v for op, v in counts.items() if str(op).removeprefix("aten.") in GEMM_OPS)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", type=Path, default=Path("models/pruned"))
    parser.add_argument("--teacher", type=Path, default=Path("models/base"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_kd_throughput"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dtype = compute_dtype()
    teacher, tokenizer = load_model(args.teacher, dtype=dtype)
    data = windows(tokenizer, args.text, args.batch, args.seq_len)
    batches = list(data.split(args.batch))
    for b in batches:  # the recovery's own top-k targets (kept in memory here)
        CACHE[b.data_ptr()] = teacher_targets(teacher, b, args.top_k, 1.0, None)

    variants = [
        "default",
        "previous",
        "frozen_embeddings",
        "cached_topk",
        "frozen+cached",
    ]
    models = {}
    for name in variants:
        student, _ = load_model(args.student, dtype=torch.float32)
        student.train()
        student.config.use_cache = False
        if name.startswith("frozen"):
            student.get_input_embeddings().weight.requires_grad_(False)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=5e-5, fused=True)
        models[name] = (student, optimizer)

    counting = {"on": False}

    def step(name, b):
        student, optimizer = models[name]
        kind = {
            "frozen+cached": "cached_topk",
            "frozen_embeddings": "default",
            "previous": "default",
        }.get(name, name)
        # the Trainer's step compiles the KL's chunk step (saap.distill.
        # fused_kl_rows) and the decoders' element-wise parts (saap.distill.
        # compiled_decoder_kernels); "previous" runs the decoders eager. Under
        # the FLOP counter (a dispatch mode dynamo does not trace) all eager:
        # the same matmuls
        eager = counting["on"]
        os.environ["SAAP_KD_COMPILE"] = "0" if eager else "1"
        kernels = (
            contextlib.nullcontext()
            if eager or name == "previous"
            else compiled_decoder_kernels(student, teacher)
        )
        with kernels:
            return variant_step(kind, student, teacher, optimizer, b)

    # warm-up: one step per variant, then one whole untimed round in the timed
    # order (the first timed steps after loading ran up to 25% slow, whichever
    # variant came first)
    for name in variants:
        step(name, batches[0])
    for name in variants:
        for i in range(args.steps):
            step(name, batches[1 + (i % (len(batches) - 1))])
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            started = time.perf_counter()
            tokens = sum(
                step(name, batches[1 + (i % (len(batches) - 1))])
                for i in range(args.steps)
            )
            timings[name].append(tokens / (time.perf_counter() - started))
            print(
                f"round {round_} {name}: {timings[name][-1]:.1f} tokens/s", flush=True
            )

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step("default", batches[1])
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=15)
    # what the matrix products alone allow: each variant's GEMM work per step,
    # at the rate the default step's own products ran in that profile
    counting["on"] = True
    work = {name: step_flops(lambda n=name: step(n, batches[1])) for name in variants}
    gemm_seconds = (
        sum(
            e.self_cpu_time_total
            for e in averages
            if e.key.removeprefix("aten::") in GEMM_OPS
        )
        / 1e6
    )
    rate = work["default"] / gemm_seconds
    tokens = batches[1].numel()

    result = {
        "dtype": str(dtype),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "tokens_per_s": {k: v for k, v in timings.items()},
        "flops_per_step": work,
        "gemm_rate_flop_s": rate,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Distillation throughput (SmolLM2-135M pruned 20%, `kd` recovery's step)",
        "",
        f"Command: `.venv/bin/python benchmarks/kd_throughput.py --steps {args.steps} "
        f"--rounds {args.rounds} --top-k {args.top_k}`; batch {args.batch} x "
        f"{args.seq_len} tokens, 2 "
        f"threads, compute dtype {dtype}; variants interleaved per round.",
        "",
        "| variant | tokens/s per round | mean | vs default, 95% CI (by round) |",
        "|---|---|---:|---|",
    ]
    for name in variants:
        mean = statistics.mean(timings[name])
        rounds = ", ".join(f"{t:.0f}" for t in timings[name])
        if name == "default":
            versus = "1"
        elif args.rounds >= 2:
            ratio = seed_ratio(timings[name], timings["default"])
            versus = f"{ratio.value:.2f}x [{ratio.lower:.2f}, {ratio.upper:.2f}]"
        else:
            versus = f"{mean / statistics.mean(timings['default']):.2f}x (1 round)"
        lines.append(f"| {name} | {rounds} | {mean:.0f} | {versus} |")
    if args.rounds >= 2:
        ratio = seed_ratio(timings["default"], timings["previous"])
        lines += [
            "",
            "The default step against the previous one (decoder parts eager), "
            f"paired by round: {ratio.value:.2f}x "
            f"[{ratio.lower:.2f}, {ratio.upper:.2f}].",
        ]
    lines += [
        "",
        "What the matrix products alone allow (everything else free): each "
        "variant's matrix-product work per step (torch.utils.flop_counter, "
        f"{tokens} tokens), at the rate the default step's products ran in the "
        f"profile below ({rate / 1e9:.0f} GFLOP/s: their FLOPs over the self time "
        "of aten::mm/addmm/bmm). Attention, element-wise work and the optimizer "
        "are outside it (the counter has no formula for the CPU attention kernel).",
        "",
        "| variant | GEMM GFLOP per step | GEMM-only ceiling (tokens/s) "
        "| measured mean / ceiling |",
        "|---|---:|---:|---:|",
    ]
    for name in variants:
        ceiling = tokens * rate / work[name]
        lines.append(
            f"| {name} | {work[name] / 1e9:.0f} | {ceiling:.0f} | "
            f"{statistics.mean(timings[name]) / ceiling:.2f} |"
        )
    lines += [
        "",
        "Profile of one default step (self CPU time):",
        "",
        "```",
        table,
        "```",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

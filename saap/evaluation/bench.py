"""Edge benchmark: size, MACs, memory, prefill and decode speed at batch 1.

Speeds are medians over repeats after a warm-up, with the thread count fixed and
recorded. Beside each measured speedup the report gives the ideal one: decoding
a token at batch 1 reads every weight once, so the bytes of weights read per
token, dense over pruned, bound the speedup a memory-bound runtime can reach.

A speedup is only measured *interleaved*: the dense model and the candidate are
timed in the same process, alternating repeat by repeat (the order swapped each
round), so drift of the machine hits both alike; the speedup is the geometric
mean of the per-round ratios, its interval a bootstrap over the rounds
(:func:`interleaved_speedup`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import DynamicCache

from saap.evaluation.intervals import paired_speedup
from saap.model import count_params, layer_shapes


def weight_bytes_per_token(model) -> int:
    """Bytes of weights read to decode one token: every matrix once, except the
    embedding table, of which one row is read (unless tied to the LM head, which
    reads it whole)."""
    element = next(model.parameters()).element_size()
    total = count_params(model)
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    skipped = 0 if tied else embed.numel() - embed.shape[1]
    return (total - skipped) * element


def macs_per_token(model, context_len: int) -> int:
    """Multiply-accumulates to process one token with ``context_len`` tokens cached:
    every linear layer (LM head included) plus attention scores and weighted sums."""
    shapes = layer_shapes(model)
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    if model.get_output_embeddings() is not None and not any(
        module is model.get_output_embeddings()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    ):
        linear += model.get_output_embeddings().weight.numel()
    attention = sum(2 * s.num_heads * s.head_dim * context_len for s in shapes)
    return int(linear + attention)


def disk_bytes(checkpoint: Path) -> int:
    """Bytes of the weight files of a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))


@torch.no_grad()
def time_prefill_decode(
    model, prompt_ids: torch.Tensor, decode_tokens: int
) -> tuple[float, list[float]]:
    """(time to first token, per-step decode seconds) at batch 1 with a KV cache.

    The first token comes out of the prefill pass, so its time is the prefill time.
    """
    cache = DynamicCache()
    start = time.perf_counter()
    out = model(input_ids=prompt_ids, cache=cache, use_cache=True)
    next_token = out.logits[:, -1:].argmax(-1)  # (1, 1)
    first = time.perf_counter()
    steps = []
    for _ in range(decode_tokens):
        tick = time.perf_counter()
        out = model(input_ids=next_token, cache=cache, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - tick)
    return first - start, steps


def static_metrics(model, checkpoint: Path, context_len: int) -> dict:
    """Size and work per token of one loaded model: nothing timed."""
    return {
        "params": count_params(model),
        "macs_per_token": macs_per_token(model, context_len),
        "context_len": context_len,
        "disk_bytes": disk_bytes(checkpoint),
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def speed_metrics(prefill_s: list[float], decode_s: list[float], prompt_len: int):
    """Medians over repeats of prefill seconds and per-token decode seconds."""
    prefill = statistics.median(prefill_s)
    decode = statistics.median(decode_s)
    return {
        "prefill_tokens_per_s": prompt_len / prefill,
        "time_to_first_token_s": prefill,
        "decode_tokens_per_s": 1.0 / decode,
        "decode_latency_ms": 1000 * decode,
    }


def benchmark(
    model,
    checkpoint: Path,
    prompt_len: int,
    decode_tokens: int,
    context_len: int,
    repeats: int,
    warmup: int,
    threads: int,
    seed: int = 0,
) -> dict:
    """The edge metrics of one loaded model (the caller fixes dtype and device)."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator)
    for _ in range(warmup):
        time_prefill_decode(model, prompt, min(decode_tokens, 8))
    prefill, decode_medians = [], []
    for _ in range(repeats):
        first, steps = time_prefill_decode(model, prompt, decode_tokens)
        prefill.append(first)
        decode_medians.append(statistics.median(steps))
    return (
        static_metrics(model, checkpoint, context_len)
        | _settings(threads, prompt_len, decode_tokens, repeats)
        | speed_metrics(prefill, decode_medians, prompt_len)
    )


def _settings(threads: int, prompt_len: int, decode_tokens: int, repeats: int):
    return {
        "threads": threads,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
    }


def benchmark_with(model, checkpoint: Path, params, **overrides) -> dict:
    """:func:`benchmark` with the settings of a ``bench`` params section
    (``BenchParams``); ``overrides`` replace single settings (e.g. ``repeats``)."""
    settings = {
        "prompt_len": params.prompt_len,
        "decode_tokens": params.decode_tokens,
        "context_len": params.context_len,
        "repeats": params.repeats,
        "warmup": params.warmup,
        "threads": params.threads,
    } | overrides
    return benchmark(model, checkpoint, **settings)


def interleaved_timings(
    models: Mapping[str, torch.nn.Module],
    prompt_len: int,
    decode_tokens: int,
    repeats: int,
    warmup: int,
    threads: int,
    vocab_size: int,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Per model, ``prefill`` and ``decode`` tokens/s of each repeat, the models
    timed alternately in one process (order reversed every other round)."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=generator)
    names = list(models)
    for _ in range(warmup):
        for name in names:
            time_prefill_decode(models[name], prompt, min(decode_tokens, 8))
    out = {name: {"prefill": [], "decode": []} for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            first, steps = time_prefill_decode(models[name], prompt, decode_tokens)
            out[name]["prefill"].append(prompt_len / first)
            out[name]["decode"].append(1.0 / statistics.median(steps))
    return out


def interleaved_speedup(
    candidate: torch.nn.Module,
    dense: torch.nn.Module,
    params,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Decode and prefill speedup of ``candidate`` over ``dense`` (PyTorch eager,
    batch 1), timed interleaved with the ``bench`` params; each with its interval
    beside the ideal (weight bytes) and MACs ratios."""
    timings = interleaved_timings(
        {"dense": dense, "candidate": candidate},
        params.prompt_len,
        params.decode_tokens,
        params.repeats,
        params.warmup,
        params.threads,
        candidate.config.vocab_size,
    )
    result: dict = {
        "runtime": "pytorch-eager",
        "dtype": str(next(candidate.parameters()).dtype).removeprefix("torch."),
        "threads": params.threads,
        "timings": timings,
    }
    for kind in ("decode", "prefill"):
        result[kind] = paired_speedup(
            timings["candidate"][kind], timings["dense"][kind], resamples, seed
        ).as_dict()
    result["decode_ideal"] = weight_bytes_per_token(dense) / weight_bytes_per_token(
        candidate
    )
    context = params.context_len
    result["macs_ratio"] = macs_per_token(dense, context) / macs_per_token(
        candidate, context
    )
    return result


def benchmark_against(model, checkpoint: Path, dense, params) -> dict:
    """The edge metrics of a candidate timed interleaved with ``dense``: its own
    figures from its rounds, and ``speedup_vs_dense`` (:func:`interleaved_speedup`)."""
    speedup = interleaved_speedup(model, dense, params)
    rounds = speedup["timings"]["candidate"]
    return (
        static_metrics(model, checkpoint, params.context_len)
        | _settings(
            params.threads, params.prompt_len, params.decode_tokens, params.repeats
        )
        | speed_metrics(
            [params.prompt_len / v for v in rounds["prefill"]],
            [1.0 / v for v in rounds["decode"]],
            params.prompt_len,
        )
        | {"speedup_vs_dense": speedup}
    )


# ------------------------------------------------------------ llama.cpp runtime


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file: what decoding a token reads, since
    every matrix is read once per token (the tied embedding is the LM head)."""
    from saap.runtime.gguf_info import read_gguf

    return read_gguf(path).tensor_bytes


def llamacpp_benchmark(
    tools,
    candidate: Mapping[str, Path],
    params,
    dense: Mapping[str, Path] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """llama.cpp figures per GGUF type (``{type: file}``): prefill and decode
    tokens/s (medians of ``params.repeats`` llama-bench runs at batch 1); with
    ``dense`` the dense file of the same type is run interleaved with the
    candidate, and each speedup gets its interval beside the ideal one
    (tensor bytes, dense over candidate)."""
    from saap.runtime.llamacpp import interleaved_bench

    out: dict = {
        "runtime": "llama.cpp",
        "build": {k: tools.info.get(k) for k in ("source", "source_sha256", "options")},
        "threads": params.threads,
        "prompt_len": params.prompt_len,
        "decode_tokens": params.decode_tokens,
        "repeats": params.repeats,
        "types": {},
    }
    for kind, path in candidate.items():
        models = {"candidate": path}
        if dense is not None:
            models = {"dense": dense[kind], "candidate": path}
        timings = interleaved_bench(
            tools,
            models,
            params.prompt_len,
            params.decode_tokens,
            params.threads,
            params.repeats,
        )
        entry = {
            "file_bytes": path.stat().st_size,
            "tensor_bytes": gguf_tensor_bytes(path),
            "prefill_tokens_per_s": statistics.median(timings["candidate"]["prefill"]),
            "decode_tokens_per_s": statistics.median(timings["candidate"]["decode"]),
            "timings": timings,
        }
        if dense is not None:
            dense_bytes = gguf_tensor_bytes(dense[kind])
            entry |= {
                "dense_file_bytes": dense[kind].stat().st_size,
                "dense_prefill_tokens_per_s": statistics.median(
                    timings["dense"]["prefill"]
                ),
                "dense_decode_tokens_per_s": statistics.median(
                    timings["dense"]["decode"]
                ),
                "decode_ideal": dense_bytes / entry["tensor_bytes"],
                "speedup": {
                    phase: paired_speedup(
                        timings["candidate"][phase],
                        timings["dense"][phase],
                        resamples,
                        seed,
                    ).as_dict()
                    for phase in ("decode", "prefill")
                },
            }
        out["types"][kind] = entry
    return out
